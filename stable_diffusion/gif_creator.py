"""Animated GIFs from generated frames: the per-frame timing and loop of the upload are kept."""

from __future__ import annotations

import io
from collections.abc import Sequence

import imageio.v3 as iio
import numpy as np
from PIL import Image

STEP_FRAME_MS = 120
FINAL_FRAME_MS = 2000


def encode_gif(frames: Sequence[Image.Image], durations_ms: Sequence[int], loop: int | None) -> bytes:
    """GIF bytes, one frame per image. `loop` None means play once, 0 means forever.

    Identical consecutive frames are merged by the encoder with their durations added, which plays
    the same.
    """
    # imageio writes a one-frame GIF as a still picture, whose writer takes one duration, not a list.
    durations = list(durations_ms) if len(frames) > 1 else durations_ms[0]
    options = {"duration": durations} | ({"loop": loop} if loop is not None else {})
    buffer = io.BytesIO()
    iio.imwrite(buffer, np.stack([np.asarray(frame.convert("RGB")) for frame in frames]), extension=".gif", **options)
    return buffer.getvalue()


def make_progress_gif(step_previews: Sequence[Image.Image], final: Image.Image) -> bytes:
    """The denoising as an animation, one frame per step, looping; the last step shows the final picture
    (the pipeline's own output, equal to the last preview) and is held longer."""
    frames = [*step_previews[:-1], final]
    durations = [STEP_FRAME_MS] * (len(frames) - 1) + [FINAL_FRAME_MS]
    return encode_gif(frames, durations, loop=0)
