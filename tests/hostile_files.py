"""A corpus of hostile and odd uploads, made in memory: `python -m tests.hostile_files DIR` writes them out.

Each is a (name, bytes) pair; the name's extension is what a careless client would claim, never what
the server believes.
"""

from __future__ import annotations

import io
import random
import struct
import sys
import zipfile
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

from tests.images import drawing, encode


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a huge picture, followed by a few bytes of pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def jpeg_bomb_header() -> bytes:
    """A small JPEG whose frame header (SOF0) claims 65535x65535."""
    data = bytearray(encode(drawing(), "JPEG"))
    start = data.index(b"\xff\xc0")
    data[start + 5 : start + 9] = struct.pack(">HH", 0xFFFF, 0xFFFF)
    return bytes(data)


def gif_bomb_header() -> bytes:
    """A small GIF whose logical screen claims 65535x65535."""
    data = bytearray(encode(drawing(), "GIF"))
    data[6:10] = struct.pack("<HH", 0xFFFF, 0xFFFF)
    return bytes(data)


def many_frame_gif(frames: int) -> bytes:
    """`frames` tiny frames that differ, so that no encoder merges them."""
    pictures = [Image.new("L", (2, 2), index % 256) for index in range(frames)]
    return encode(pictures[0], "GIF", save_all=True, append_images=pictures[1:], duration=20)


def cuts(data: bytes, *points: float) -> list[bytes]:
    return [data[: max(1, int(len(data) * point))] for point in points]


def hostile_files() -> list[tuple[str, bytes]]:
    rng = random.Random(1234)
    png, jpeg, gif = encode(drawing(), "PNG"), encode(drawing(), "JPEG"), encode(drawing(), "GIF")
    rotated = drawing(160, 80)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("image.png", png)
    palette = Image.new("P", (64, 48), 0)
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    ImageDraw.Draw(palette).rectangle((8, 8, 40, 40), outline=1)
    grey16 = Image.new("I;16", (64, 48), 1000)
    ImageDraw.Draw(grey16).rectangle((8, 8, 40, 40), outline=60000)
    mpo = io.BytesIO()
    drawing().save(mpo, "MPO", save_all=True, append_images=[drawing(160, 120).rotate(90)])
    text_bomb = png[:33] + _png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"A" * 50_000_000)) + png[33:]

    files = [
        ("empty.png", b""),
        ("random-1k.png", rng.randbytes(1024)),
        ("random-200k.jpg", rng.randbytes(200_000)),
        ("text.png", b"just some text, not a picture\n"),
        ("page.png", b"<!doctype html><html><body><script>alert(1)</script></body></html>"),
        ("vector.png", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect width="9"/></svg>'),
        ("archive.png", archive.getvalue()),
        ("document.jpg", b"%PDF-1.7\n1 0 obj\n<< >>\nendobj\n"),
        ("magic-then-garbage.png", png[:8] + rng.randbytes(500)),
        ("bad-crc.png", png[:29] + b"\0\0\0\0" + png[33:]),
        ("png-bomb.png", png_bomb_header()),
        ("jpeg-bomb.jpg", jpeg_bomb_header()),
        ("gif-bomb.gif", gif_bomb_header()),
        ("png-text-bomb.png", text_bomb),
        ("10000-frames.gif", many_frame_gif(10_000)),
        ("one-pixel.png", encode(Image.new("RGB", (1, 1), "white"))),
        ("1000x16.png", encode(drawing(1000, 16))),
        ("16x1000.png", encode(drawing(16, 1000))),
        ("grey-16-bit.png", encode(grey16)),
        ("cmyk.jpg", encode(drawing().convert("CMYK"), "JPEG")),
        ("grey.jpg", encode(drawing().convert("L"), "JPEG")),
        ("grey-alpha.png", encode(drawing().convert("LA"))),
        ("transparent.png", encode(Image.new("RGBA", (64, 48), (0, 0, 0, 0)))),
        ("one-bit.png", encode(drawing().convert("1"))),
        ("palette-transparency.png", encode(palette, transparency=0)),
        ("exif-rotated.jpg", encode(rotated, "JPEG", exif=exif)),
        ("progressive.jpg", encode(drawing(), "JPEG", progressive=True)),
        ("multi-picture.mpo", mpo.getvalue()),
        ("animated.png", encode(drawing(), "PNG", save_all=True, append_images=[drawing().rotate(45)])),
        ("webp.png", encode(drawing(), "WEBP")),
        ("bitmap.png", encode(drawing(), "BMP")),
        ("tiff.png", encode(drawing(), "TIFF")),
        ("icon.png", encode(drawing(), "ICO")),
        ("jpeg-named.gif", jpeg),
    ]
    for index, part in enumerate(cuts(png, 0.01, 0.2, 0.5, 0.9), 1):
        files.append((f"truncated-png-{index}.png", part))
    files.append(("png-without-end.png", png[:-12]))
    for index, part in enumerate(cuts(jpeg, 0.01, 0.2, 0.5, 0.95), 1):
        files.append((f"truncated-jpeg-{index}.jpg", part))
    for index, part in enumerate(cuts(gif, 0.02, 0.3, 0.6, 0.95), 1):
        files.append((f"truncated-gif-{index}.gif", part))
    return files


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in hostile_files():
        (folder / name).write_bytes(data)
    print(f"wrote {len(hostile_files())} files to {folder}")
