"""A job's life as its record tells it: its upload saved, its run started, progress with a small preview at
most once a second, and how it ended. The same code records wherever the job runs: in the web process
(local mode), or on the GPU worker that runs it (QUEUE_BACKEND=celery, into the shared store)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import cast

from service.errors import GenerationCanceled, ServiceError
from service.jobs.store import JobStatus, JobStore, SharedJobStore
from stable_diffusion.image_processing import encode_png, thumbnail
from stable_diffusion.recipe import GenerationEvent, Started

CANCELED_QUEUED = "Canceled before it started."
# Watchers get a preview picture at most this often, this many pixels on its longer side.
PREVIEW_INTERVAL_S = 1.0
PREVIEW_SIZE = 256


class JobRecorder:
    """Records one job's run in `store`; `on_change` hears of each change (local mode's watchers wait on it)."""

    def __init__(self, store: JobStore, job_id: str, on_change: Callable[[], None] | None = None) -> None:
        self.store, self.job_id = store, job_id
        self._on_change = on_change
        self._preview_at = -PREVIEW_INTERVAL_S
        self._total = 0

    def taken(self, input_file: str) -> None:
        """The upload is saved (before the job is queued: a finished record is final)."""
        self._record(input_file=input_file)

    def on_event(self, event: GenerationEvent) -> None:
        """On the generation thread, at every step."""
        if isinstance(event, Started):
            self._total = event.total
            self._record(status=JobStatus.RUNNING, step=0, total=event.total, started_at=time.time())
            return
        if time.monotonic() - self._preview_at >= PREVIEW_INTERVAL_S:
            self._preview_at = time.monotonic()
            self.store.put_preview(self.job_id, encode_png(thumbnail(event.preview(), PREVIEW_SIZE)))
        self._record(step=event.step, total=event.total)

    def finished(self, future: Future) -> None:
        """The run's future is done: record how it ended (its output, a RenderedOutput, is saved already)."""
        if future.cancelled():
            changes: dict[str, object] = {"status": JobStatus.CANCELED, "error": CANCELED_QUEUED}
        elif isinstance(error := future.exception(), GenerationCanceled):
            changes = {"status": JobStatus.CANCELED, "error": error.message}
        elif isinstance(error, ServiceError):
            changes = {"status": JobStatus.FAILED, "error": error.message}
        elif error is not None:
            changes = {"status": JobStatus.FAILED, "error": f"Generation failed ({type(error).__name__})."}
        else:
            output = future.result()
            if self.store.shared:
                # Before the status: whoever reads "succeeded" finds the result.
                cast(SharedJobStore, self.store).put_result(self.job_id, output.data)
            changes = {
                "status": JobStatus.SUCCEEDED, "result_file": output.file_name, "result_type": output.mimetype,
                "step": self._total,
            }
        self._record(finished_at=time.time(), **changes)

    def canceled(self, message: str = CANCELED_QUEUED) -> None:
        self._record(status=JobStatus.CANCELED, error=message, finished_at=time.time())

    def _record(self, **changes: object) -> None:
        self.store.update(self.job_id, **changes)
        if self._on_change is not None:
            self._on_change()
