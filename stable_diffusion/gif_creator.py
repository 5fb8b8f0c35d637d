"""Animated GIFs from generated frames: the per-frame timing and loop of the upload are kept."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

STEP_FRAME_MS = 120
FINAL_FRAME_MS = 2000


def encode_gif(frames: Sequence[Image.Image], durations_ms: Sequence[int], loop: int | None) -> bytes:
    """GIF bytes, one frame per image. `loop` None means play once, 0 means forever.

    Pillow's own writer with `save_all`, which takes a list of durations however many frames there are
    (imageio's plugin wrote a single frame without it, and Pillow's single-frame path fails on a list).
    Identical consecutive frames are merged by the encoder with their durations added, which plays
    the same.
    """
    first, *rest = [frame.convert("RGB") for frame in frames]
    options = {"loop": loop} if loop is not None else {}
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=rest, duration=list(durations_ms), **options)
    return buffer.getvalue()


def make_progress_gif(step_previews: Sequence[Image.Image], final: Image.Image) -> bytes:
    """The denoising as an animation, one frame per step, looping; the last step shows the final picture
    (the pipeline's own output, equal to the last preview) and is held longer."""
    frames = [*step_previews[:-1], final]
    durations = [STEP_FRAME_MS] * (len(frames) - 1) + [FINAL_FRAME_MS]
    return encode_gif(frames, durations, loop=0)
