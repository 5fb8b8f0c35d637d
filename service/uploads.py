"""Uploads on their way in: how many are decoded at once, and the one path from an upload to a request
(decode, edge maps, the upload saved in INPUT_DIR) that every generation backend takes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from service.errors import DecodersBusy, ServiceError
from service.rendering import build_request
from service.storage import new_file_stem, write_atomically
from stable_diffusion.image_processing import (
    FILE_EXTENSIONS,
    DecodedImage,
    DecodeLimits,
    decode_upload,
    encode_png,
    make_control_image,
)
from stable_diffusion.recipe import GenerationRequest

if TYPE_CHECKING:
    from service.jobs.recording import JobRecorder


class DecodeSlots:
    """At most `count` uploads decoded (and turned into edge maps) at once, whatever the number of HTTP
    threads: a picture at the pixel limit takes several hundred MB while it is decoded, so this bounds
    the memory all requests together can take. A request waits up to `wait_s` for a slot, then gets a
    503 with Retry-After: refusing beats swapping or being killed for memory."""

    def __init__(self, count: int, wait_s: float = 10.0) -> None:
        self.count, self.wait_s = count, wait_s
        self._slots = threading.BoundedSemaphore(count)

    @contextmanager
    def hold(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise DecodersBusy(
                f"The server is busy decoding other uploads ({self.count} at once, MAX_CONCURRENT_DECODES); "
                "retry in a few seconds.",
                retry_after=2,
            )
        try:
            yield
        finally:
            self._slots.release()


@dataclass(frozen=True)
class Prepared:
    """An upload turned into a generation request. `upload` keeps what answering needs (format, GIF
    timing) without the pixels; `stem` names the output like its upload, `input_file` in INPUT_DIR."""

    request: GenerationRequest
    upload: DecodedImage
    stem: str
    input_file: str


class UploadDesk:
    """Decodes uploads (a bounded number at once), makes their edge maps and keeps them in INPUT_DIR."""

    def __init__(self, input_dir: Path, limits: DecodeLimits, concurrent_decodes: int) -> None:
        self.input_dir, self._limits = input_dir, limits
        self._slots = DecodeSlots(concurrent_decodes)
        input_dir.mkdir(parents=True, exist_ok=True)

    def prepare(self, fields: BaseModel, upload: bytes, request_id: str) -> Prepared:
        """The request, with the upload saved first: a disk too full for it (507) costs no generation."""
        with self._slots.hold():
            decoded = decode_upload(upload, self._limits)
            request = build_request(request_id, fields, decoded)
            decoded = decoded.without_frames()
        stem = new_file_stem()
        input_file = f"{stem}.{FILE_EXTENSIONS[decoded.format]}"
        write_atomically(self.input_dir / input_file, upload)
        return Prepared(request, decoded, stem, input_file)

    def prepare_job(self, fields: BaseModel, upload: bytes, recorder: JobRecorder) -> Prepared:
        """As `prepare`, for a job: its record names the upload before the job is queued (a finished record is
        final); a record that cannot be written leaves no upload behind."""
        prepared = self.prepare(fields, upload, recorder.job_id)
        try:
            recorder.taken(prepared.input_file)
        except ServiceError:
            self.discard(prepared)
            raise
        return prepared

    def discard(self, prepared: Prepared) -> None:
        """The request was refused after all: its upload is not kept."""
        (self.input_dir / prepared.input_file).unlink(missing_ok=True)

    def edge_map(self, fields: BaseModel, upload: bytes) -> bytes:
        """The PNG of the Canny edge map of the upload's first frame."""
        with self._slots.hold():
            first = decode_upload(upload, self._limits).frames[0]
            edges = make_control_image(first, fields.resolution, fields.low_threshold, fields.high_threshold)
        return encode_png(edges)
