"""Pictures for the tests, made in memory: real encoded files, as a client would upload them."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


def drawing(width: int = 160, height: int = 120) -> Image.Image:
    """A white picture with a black rectangle and circle: clear edges for Canny."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 8, width // 2, height // 2), outline="black", width=3)
    draw.ellipse((width // 3, height // 3, width * 7 // 8, height * 7 // 8), outline="black", width=3)
    return image


def encode(image: Image.Image, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_bytes(width: int = 160, height: int = 120) -> bytes:
    return encode(drawing(width, height))


def animated_gif_bytes(durations: list[int], loop: int = 0, size: tuple[int, int] = (96, 64)) -> bytes:
    """A GIF whose frames differ (a square moving right on a changing grey), with the given durations."""
    frames = []
    for index in range(len(durations)):
        frame = Image.new("RGB", size, (255 - index % 128,) * 3)
        left = 4 + index * 12
        ImageDraw.Draw(frame).rectangle((left, 8, left + 30, 50), outline="black", width=3)
        frames.append(frame)
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=durations, loop=loop)
