"""The one thread that owns the GPU: a bounded queue of generation requests, each answered by a future.

The HTTP layer only sees `submit(request) -> Future` and `close()`, so a remote queue (Celery) can
take this class's place without touching it.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from concurrent.futures import Future

import torch

from stable_diffusion.errors import GenerationFailed, GenerationOutOfMemory, QueueFull
from stable_diffusion.pipeline_service import (
    GenerationRequest,
    GenerationResult,
    PipelineService,
    ProgressCallback,
)

log = logging.getLogger(__name__)

_STOP = object()


class GenerationWorker:
    def __init__(self, service: PipelineService, queue_size: int) -> None:
        self.service = service
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._average_seconds = 1.0
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def submit(
        self, request: GenerationRequest, on_step: ProgressCallback | None = None
    ) -> Future[GenerationResult]:
        """Queue a request; raises QueueFull at once rather than waiting for room."""
        future: Future[GenerationResult] = Future()
        try:
            self._queue.put_nowait((request, on_step, future))
        except queue.Full:
            wait = max(1, math.ceil(self._average_seconds * self._queue.maxsize))
            raise QueueFull(
                f"The generation queue is full ({self._queue.maxsize} waiting); retry in about {wait} s.",
                retry_after=wait,
            ) from None
        return future

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            request, on_step, future = item
            if future.set_running_or_notify_cancel():
                self._serve(request, on_step, future)

    def _serve(self, request: GenerationRequest, on_step, future: Future) -> None:
        try:
            result = self.service.run(request, on_step)
        except torch.OutOfMemoryError:
            log.exception("request %s: out of GPU memory", request.request_id)
            _free_gpu_memory()
            future.set_exception(
                GenerationOutOfMemory(
                    "The GPU ran out of memory for this request; retry with a lower resolution "
                    "or fewer GIF frames.",
                    retry_after=5,
                )
            )
        except Exception as exc:
            log.exception("request %s: generation failed", request.request_id)
            future.set_exception(
                GenerationFailed(
                    f"Generation failed ({type(exc).__name__}); the server logged the details under "
                    f"request id {request.request_id}."
                )
            )
        else:
            self._average_seconds = 0.8 * self._average_seconds + 0.2 * result.seconds
            future.set_result(result)


def _free_gpu_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
