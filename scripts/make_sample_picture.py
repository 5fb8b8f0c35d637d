"""Draws examples/lighthouse.png, the sample picture the README's examples send: a line drawing of our own
making (no one else's rights in it), a few KB, whose edges give the model something to follow.

    .venv/bin/python scripts/make_sample_picture.py    # writes it again; the same bytes every time
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lighthouse.png"
SIZE = (384, 288)
INK = 0


def draw_lighthouse() -> Image.Image:
    picture = Image.new("L", SIZE, 255)
    pen = ImageDraw.Draw(picture)
    # The cliff and the sea.
    pen.polygon([(0, 210), (90, 190), (170, 200), (230, 288), (0, 288)], outline=INK, width=3)
    for row, y in enumerate(range(225, 288, 14)):
        for x in range(240 + 10 * (row % 2), 384, 40):
            pen.arc([x, y, x + 30, y + 12], 200, 340, fill=INK, width=2)
    # The tower, its stripes, the lamp room and the roof.
    pen.polygon([(95, 195), (145, 195), (133, 80), (107, 80)], outline=INK, width=3)
    for y in (115, 150):
        pen.line([(95 + (195 - y) * 12 / 115, y), (145 - (195 - y) * 12 / 115, y)], fill=INK, width=3)
    pen.rectangle([102, 58, 138, 80], outline=INK, width=3)
    pen.polygon([(98, 58), (142, 58), (120, 36)], outline=INK, width=3)
    # The beams, the moon and two birds.
    for end in ((10, 40), (10, 80), (230, 40), (230, 80)):
        pen.line([(120, 69), end], fill=INK, width=1)
    pen.ellipse([300, 30, 340, 70], outline=INK, width=3)
    for x, y in ((250, 110), (285, 125)):
        pen.arc([x, y, x + 16, y + 12], 200, 340, fill=INK, width=2)
        pen.arc([x + 16, y, x + 32, y + 12], 200, 340, fill=INK, width=2)
    return picture


def sample_bytes() -> bytes:
    buffer = io.BytesIO()
    draw_lighthouse().convert("1").save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


if __name__ == "__main__":
    SAMPLE.parent.mkdir(exist_ok=True)
    SAMPLE.write_bytes(sample_bytes())
    print(f"wrote {SAMPLE.relative_to(Path.cwd()) if SAMPLE.is_relative_to(Path.cwd()) else SAMPLE}")
