"""The one thread that owns the GPU: it loads the model, then serves a bounded queue of generation
requests, each answered by a future.

The HTTP layer only sees `submit(request) -> Future`, `state` and `close()`, so a remote queue (Celery)
can take this class's place without touching it.
"""

from __future__ import annotations

import logging
import math
import queue
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future

import torch

from stable_diffusion.errors import (
    GenerationCanceled,
    GenerationFailed,
    GenerationOutOfMemory,
    ModelNotReady,
    QueueFull,
    TooManyRequests,
)
from stable_diffusion.pipeline_service import (
    GenerationRequest,
    GenerationResult,
    PipelineService,
    ProgressCallback,
)

log = logging.getLogger(__name__)

_STOP = object()
# Called after every successful generation, on the worker thread; metrics listen here.
ResultObserver = Callable[[GenerationRequest, GenerationResult], None]


class GenerationWorker:
    """States: loading -> ready -> stopped, or loading -> failed when the model cannot be loaded."""

    def __init__(
        self,
        load: Callable[[], PipelineService],
        queue_size: int,
        on_load_failed: Callable[[Exception], None] | None = None,
        max_per_owner: int | None = None,
    ) -> None:
        self.state = "loading"
        self.load_error: Exception | None = None
        self._load, self._on_load_failed = load, on_load_failed
        self._service: PipelineService | None = None
        self._loaded = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._observers: list[ResultObserver] = []
        # Queued or running requests per owner (API key), so that one client cannot fill the queue.
        self._max_per_owner = max_per_owner or sys.maxsize
        self._per_owner: Counter[str] = Counter()
        self._owners_lock = threading.Lock()
        self._average_seconds = 1.0
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._thread.start()

    @property
    def service(self) -> PipelineService:
        if self._service is None:
            raise ModelNotReady(
                "The model failed to load; see the server log." if self.state == "failed"
                else "The model is still loading; retry in a few seconds.",
                retry_after=5,
            )
        return self._service

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def queue_size(self) -> int:
        return self._queue.maxsize

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        """True once the model is loaded; False on timeout or when loading failed."""
        return self._loaded.wait(timeout) and self.state == "ready"

    def observe(self, observer: ResultObserver) -> None:
        self._observers.append(observer)

    def submit(
        self, request: GenerationRequest, on_step: ProgressCallback | None = None, owner: str = ""
    ) -> Future[GenerationResult]:
        """Queue a request (also while the model loads). Raises at once rather than waiting for room:
        QueueFull when the queue is full, TooManyRequests when `owner` already has its share in it."""
        if self.state in ("failed", "stopped"):
            raise ModelNotReady(f"The generation worker is {self.state}; the server cannot take work now.")
        future: Future[GenerationResult] = Future()
        with self._owners_lock:
            if self._per_owner[owner] >= self._max_per_owner:
                wait = max(1, math.ceil(self._average_seconds))
                raise TooManyRequests(
                    f"This API key already has {self._per_owner[owner]} requests queued or running, the most "
                    f"one key may have (MAX_QUEUED_PER_KEY); wait for one to finish (about {wait} s).",
                    retry_after=wait,
                )
            try:
                self._queue.put_nowait((request, on_step, future))
            except queue.Full:
                wait = max(1, math.ceil(self._average_seconds * self._queue.maxsize))
                raise QueueFull(
                    f"The generation queue is full ({self._queue.maxsize} waiting); retry in about {wait} s.",
                    retry_after=wait,
                ) from None
            self._per_owner[owner] += 1
        future.add_done_callback(lambda _: self._release(owner))
        return future

    def _release(self, owner: str) -> None:
        with self._owners_lock:
            self._per_owner[owner] -= 1
            if not self._per_owner[owner]:
                del self._per_owner[owner]

    def position(self, future: Future) -> int | None:
        """How many requests wait ahead of `future` (0: next), or None once it left the queue."""
        with self._queue.mutex:
            waiting = [item[2] for item in self._queue.queue if item is not _STOP]
        return waiting.index(future) if future in waiting else None

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        # Loading here, on the thread that runs every generation, keeps all torch work on one thread.
        try:
            self._service = self._load()
        except Exception as exc:
            self.state, self.load_error = "failed", exc
            self._loaded.set()
            self._fail_queued()
            if self._on_load_failed is not None:
                self._on_load_failed(exc)
            return
        self.state = "ready"
        self._loaded.set()
        while (item := self._queue.get()) is not _STOP:
            request, on_step, future = item
            if future.set_running_or_notify_cancel():
                self._serve(request, on_step, future)
        self.state = "stopped"

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[2].set_running_or_notify_cancel():
                item[2].set_exception(ModelNotReady("The model failed to load; see the server log."))

    def _serve(self, request: GenerationRequest, on_step, future: Future) -> None:
        try:
            result = self._service.run(request, on_step)
        except GenerationCanceled as exc:
            log.info("request %s: canceled while running", request.request_id)
            future.set_exception(exc)
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
            for observer in self._observers:
                try:
                    observer(request, result)
                except Exception:
                    log.exception("a result observer failed")
            future.set_result(result)


def _free_gpu_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
