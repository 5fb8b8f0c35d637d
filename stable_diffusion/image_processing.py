"""Uploaded pictures in, control images and PNG bytes out: decoding, limits, resizing, Canny edges."""

from __future__ import annotations

import ctypes
import io
import json
from dataclasses import dataclass, replace

import cv2
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from stable_diffusion.errors import InvalidField, UnsupportedImage

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF")
FILE_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif"}

# Our pixel limit is checked from the header before any pixel is decoded. Pillow's own check (an error
# from twice its MAX_IMAGE_PIXELS) stays as a backstop; its warning below that is left alone, because
# turning it into an error would change warning filters for the whole process on import.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
# mallopt's parameter number for the size from which allocations are mapped on their own (malloc.h).
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    max_frames: int


@dataclass(frozen=True)
class DecodedImage:
    """A fully decoded upload: RGB frames upright, with the GIF timing needed to rebuild it."""

    format: str
    frames: tuple[Image.Image, ...]
    durations_ms: tuple[int, ...]
    loop: int | None

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size

    @property
    def is_animated(self) -> bool:
        return len(self.durations_ms) > 1

    def without_frames(self) -> DecodedImage:
        """What answering needs once the edge maps are made (format, GIF timing), without the pixels:
        a queued request should not hold a full-size picture."""
        return replace(self, frames=())


def return_freed_pictures_to_the_os() -> None:
    """glibc keeps freed memory in per-thread arenas, so every HTTP thread that once decoded a large
    picture would keep that much for good; allocations from 4 MB on are mapped on their own instead,
    and so given back when freed. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 4 * 1024 * 1024)


def decode_upload(data: bytes, limits: DecodeLimits) -> DecodedImage:
    """Decode every pixel of an upload, or raise a 4xx error that says what is wrong with it."""
    if not data:
        raise InvalidField("image: the uploaded file is empty; attach a PNG, JPEG or GIF file.")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        return _decode_checked(image, limits)
    except UnidentifiedImageError:
        raise UnsupportedImage(
            "image: the file is not a PNG, JPEG or GIF (decided from its content, not its name); "
            "convert it to one of those formats."
        ) from None
    except Image.DecompressionBombError:
        raise InvalidField(_too_many_pixels_message(limits)) from None
    except _DECODE_ERRORS:
        raise UnsupportedImage(
            "image: the file could not be decoded (it is truncated or corrupt); "
            "re-export it and upload it again."
        ) from None


def _decode_checked(image: Image.Image, limits: DecodeLimits) -> DecodedImage:
    width, height = image.size
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        raise InvalidField(_too_many_pixels_message(limits, width, height))
    # A multi-picture JPEG (MPO) is a JPEG to us: its first picture is the main one.
    image_format = "JPEG" if image.format == "MPO" else image.format
    if image_format != "GIF":
        # Multi-picture JPEGs (MPO) keep only their first, main picture.
        return DecodedImage(image_format, (_upright_rgb(image),), (0,), None)
    frames, durations = [], []
    for index in range(limits.max_frames + 1):
        try:
            image.seek(index)
        except EOFError:
            break
        if index == limits.max_frames:
            raise InvalidField(
                f"image: the GIF has more than {limits.max_frames} frames, the limit (MAX_GIF_FRAMES); "
                "trim it and upload it again."
            )
        if width * height * (index + 1) > limits.max_pixels:
            raise InvalidField(
                f"image: the GIF's frames hold more than {limits.max_pixels} pixels in all "
                "(MAX_IMAGE_PIXELS); use fewer or smaller frames."
            )
        frames.append(_upright_rgb(image))
        durations.append(int(image.info.get("duration", 100)))
    return DecodedImage("GIF", tuple(frames), tuple(durations), image.info.get("loop"))


def _too_many_pixels_message(limits: DecodeLimits, width: int = 0, height: int = 0) -> str:
    size = f"{width}x{height} " if width and height else ""
    return (
        f"image: its size {size}is over the limit of {limits.max_pixels} pixels (MAX_IMAGE_PIXELS); "
        "downscale it and upload it again."
    )


def _upright_rgb(frame: Image.Image) -> Image.Image:
    """Apply EXIF orientation and flatten any transparency onto white, holding as few copies of the
    picture at once as can be (at the pixel limit, each is over a hundred MB)."""
    frame.load()
    ImageOps.exif_transpose(frame, in_place=True)
    if frame.mode in ("LA", "PA") or (frame.mode == "P" and "transparency" in frame.info):
        frame = frame.convert("RGBA")
    if frame.mode == "RGBA":
        flat = Image.new("RGB", frame.size, "white")
        flat.paste(frame, mask=frame)
        return flat
    if frame.mode.startswith("I;16"):
        # 16-bit greyscale: scale to 8 bits instead of clipping at 255.
        pixels = np.asarray(frame, dtype=np.uint16) >> 8
        return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")
    return frame.convert("RGB")


def fit_size(width: int, height: int, longer_side: int) -> tuple[int, int]:
    """Scale so the longer side is `longer_side`, keeping the aspect ratio, both sides multiples of 8."""
    scale = longer_side / max(width, height)
    return (
        max(8, round(width * scale / 8) * 8),
        max(8, round(height * scale / 8) * 8),
    )


def make_canny_edges(image: Image.Image, low_threshold: int, high_threshold: int) -> Image.Image:
    """OpenCV's Canny edges as a 3-channel white-on-black picture, the form ControlNet expects."""
    grey = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, low_threshold, high_threshold)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def make_control_image(frame: Image.Image, longer_side: int, low_threshold: int, high_threshold: int) -> Image.Image:
    """One frame resized for the pipeline and turned into its edge map."""
    resized = frame.resize(fit_size(*frame.size, longer_side), Image.Resampling.LANCZOS)
    return make_canny_edges(resized, low_threshold, high_threshold)


def make_control_images(
    upload: DecodedImage, longer_side: int, low_threshold: int, high_threshold: int
) -> list[Image.Image]:
    """Every frame's edge map, as the pipeline takes them."""
    return [make_control_image(frame, longer_side, low_threshold, high_threshold) for frame in upload.frames]


def thumbnail(image: Image.Image, longer_side: int) -> Image.Image:
    """A copy at most `longer_side` pixels on its longer side, the aspect ratio kept."""
    small = image.copy()
    small.thumbnail((longer_side, longer_side))
    return small


def encode_png(image: Image.Image, parameters: str | None = None, recipe: dict | None = None) -> bytes:
    """PNG bytes, carrying the recipe (if given) as AUTOMATIC1111's `parameters` text chunk and as JSON."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    if recipe is not None:
        info.add_text("recipe", json.dumps(recipe, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
