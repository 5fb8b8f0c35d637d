"""Decoding and preparing uploads: sizes, orientation, modes, edges, limits."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image, ImageFilter

from service.errors import DecodersBusy
from service.uploads import DecodeSlots
from stable_diffusion.errors import InvalidField, UnsupportedImage
from stable_diffusion.image_processing import DecodeLimits, decode_upload, fit_size, make_canny_edges
from tests.images import animated_gif_bytes, drawing, encode

LIMITS = DecodeLimits(max_pixels=40_000_000, max_frames=48)


@pytest.mark.parametrize(
    ("size", "longer", "expected"),
    [((160, 120), 512, (512, 384)), ((120, 160), 512, (384, 512)), ((1000, 16), 256, (256, 8)),
     ((333, 777), 512, (216, 512))],
)
def test_fit_size_keeps_aspect_with_sides_multiple_of_8(size, longer, expected):
    assert fit_size(*size, longer) == expected


def test_canny_edges_are_black_and_white_and_follow_thresholds():
    picture = drawing(200, 150)
    edges = np.asarray(make_canny_edges(picture, 100, 200))
    assert edges.shape == (150, 200, 3) and set(np.unique(edges)) == {0, 255}
    soft = picture.filter(ImageFilter.GaussianBlur(2)).point(lambda value: 100 + value // 4)
    assert np.asarray(make_canny_edges(soft, 10, 20)).sum() > np.asarray(make_canny_edges(soft, 200, 250)).sum()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_every_common_mode_becomes_rgb(mode):
    image = drawing().convert("RGBA" if mode == "I;16" else mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(drawing().convert("L"), dtype=np.uint16) * 257)
    image_format = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode_upload(encode(image, image_format), LIMITS)
    assert decoded.frames[0].mode == "RGB" and decoded.size == (160, 120)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert decode_upload(encode(image), LIMITS).frames[0].getpixel((3, 3)) == (255, 255, 255)


def test_half_transparent_pixels_are_blended_onto_white():
    image = Image.new("RGBA", (16, 16), (0, 0, 200, 128))
    red, green, blue = decode_upload(encode(image), LIMITS).frames[0].getpixel((3, 3))
    assert abs(red - 127) <= 1 and abs(green - 127) <= 1 and abs(blue - 227) <= 1


def test_when_every_decode_slot_stays_taken_the_next_upload_gets_503_with_retry_after():
    slots = DecodeSlots(1, wait_s=0.1)
    with slots.hold():
        with pytest.raises(DecodersBusy, match="MAX_CONCURRENT_DECODES") as refused:
            with slots.hold():
                pass
    assert refused.value.status == 503 and refused.value.retry_after >= 1
    with slots.hold():  # the slot is free again
        pass


def test_gif_frames_durations_and_loop_are_read():
    decoded = decode_upload(animated_gif_bytes([40, 90, 130], loop=2), LIMITS)
    assert len(decoded.frames) == 3 and decoded.durations_ms == (40, 90, 130) and decoded.loop == 2


def test_783_frame_gif_is_rejected_well_under_a_second():
    payload = animated_gif_bytes([20] * 783, size=(64, 64))
    started = time.perf_counter()
    with pytest.raises(InvalidField, match="more than 48 frames"):
        decode_upload(payload, LIMITS)
    assert time.perf_counter() - started < 0.5


def test_gif_total_pixels_are_bounded():
    with pytest.raises(InvalidField, match="pixels in all"):
        decode_upload(animated_gif_bytes([20] * 5, size=(100, 100)), DecodeLimits(max_pixels=30_000, max_frames=48))


@pytest.mark.parametrize("cut", [0.25, 0.5, 0.9])
def test_truncated_files_are_unsupported_not_crashes(cut):
    for payload in (encode(drawing(), "PNG"), encode(drawing(), "JPEG"), animated_gif_bytes([50, 50])):
        with pytest.raises((UnsupportedImage, InvalidField)):
            decode_upload(payload[: int(len(payload) * cut)], LIMITS)
