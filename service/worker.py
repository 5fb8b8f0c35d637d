"""The one thread that owns the GPU: it loads the model, then serves a bounded queue of generation
requests, each answered by a future.

The HTTP layer only sees `submit(request) -> Future`, `state` and `close()`, so a remote queue (Celery)
can take this class's place without touching it.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

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

# Called after every successful generation, on the worker thread; metrics listen here.
ResultObserver = Callable[[GenerationRequest, GenerationResult], None]


class GenerationWorker:
    """States: loading -> warming_up -> ready -> stopped, or -> failed when the model cannot be loaded
    or warmed up."""

    def __init__(
        self,
        load: Callable[[], PipelineService],
        queue_size: int,
        on_load_failed: Callable[[Exception], None] | None = None,
        max_per_owner: int | None = None,
        max_batch: int = 1,
        batch_wait_s: float = 0.0,
    ) -> None:
        self.state = "loading"
        self.load_error: Exception | None = None
        self._load, self._on_load_failed = load, on_load_failed
        self._service: PipelineService | None = None
        self._loaded = threading.Event()
        # Waiting requests, oldest first, and the per-key counts: the condition guards both and wakes
        # the worker thread.
        self._pending: deque[_Item] = deque()
        self._queue_size = queue_size
        self._wakeup = threading.Condition()
        self._stopping = False
        self._max_batch, self._batch_wait_s = max_batch, batch_wait_s
        self._observers: list[ResultObserver] = []
        # Queued or running requests per owner (API key), so that one client cannot fill the queue.
        self._max_per_owner = max_per_owner or sys.maxsize
        self._per_owner: Counter[str] = Counter()
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
        return len(self._pending)

    @property
    def queue_size(self) -> int:
        return self._queue_size

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
        future: Future[GenerationResult] = Future()
        with self._wakeup:
            self._check_room(owner)
            item = _Item(request, on_step, future)
            self._pending.append(item)
            self._per_owner[owner] += 1
            self._wakeup.notify()
        future.add_done_callback(lambda _: self._release(owner, item))
        return future

    def check_room(self, owner: str = "") -> None:
        """Raise now what `submit` would raise for `owner`, so that a request is refused before the
        costly part of preparing it (decoding the upload)."""
        with self._wakeup:
            self._check_room(owner)

    @contextmanager
    def counted(self, owner: str) -> Iterator[None]:
        """Count work done outside the queue (an edge map) against `owner`'s share of requests in
        flight, raising TooManyRequests when that share is taken."""
        with self._wakeup:
            self._check_owner(owner)
            self._per_owner[owner] += 1
        try:
            yield
        finally:
            self._release(owner)

    def _check_room(self, owner: str) -> None:
        if self.state in ("failed", "stopped"):
            raise ModelNotReady(f"The generation worker is {self.state}; the server cannot take work now.")
        self._check_owner(owner)
        if len(self._pending) >= self._queue_size:
            wait = max(1, math.ceil(self._average_seconds * self._queue_size / self._max_batch))
            raise QueueFull(
                f"The generation queue is full ({self._queue_size} waiting); retry in about {wait} s.",
                retry_after=wait,
            )

    def _check_owner(self, owner: str) -> None:
        if self._per_owner[owner] >= self._max_per_owner:
            wait = max(1, math.ceil(self._average_seconds))
            raise TooManyRequests(
                f"This API key already has {self._per_owner[owner]} requests queued or running, the most "
                f"one key may have (MAX_QUEUED_PER_KEY); wait for one to finish (about {wait} s).",
                retry_after=wait,
            )

    def _release(self, owner: str, item: _Item | None = None) -> None:
        """When a request ends, its key's count drops; a request canceled while queued (a job's cancel,
        a /generate that timed out) also gives its place in the queue back now, not when its turn comes."""
        with self._wakeup:
            self._per_owner[owner] -= 1
            if not self._per_owner[owner]:
                del self._per_owner[owner]
            if item is not None and item in self._pending:
                self._pending.remove(item)

    def position(self, future: Future) -> int | None:
        """How many requests wait ahead of `future` (0: next), or None once it left the queue."""
        with self._wakeup:
            waiting = [item.future for item in self._pending]
        return waiting.index(future) if future in waiting else None

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        # Loading here, on the thread that runs every generation, keeps all torch work on one thread.
        try:
            self._service = self._load()
            self.state = "warming_up"
            self._service.warm_up()
        except Exception as exc:
            self._service = None
            self.state, self.load_error = "failed", exc
            self._loaded.set()
            self._fail_queued()
            if self._on_load_failed is not None:
                self._on_load_failed(exc)
            return
        self.state = "ready"
        self._loaded.set()
        while batch := self._next_batch():
            running = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if running:
                self._serve(running)
        self.state = "stopped"

    def _next_batch(self) -> list[_Item]:
        """The oldest request, with the queued ones that can share its denoising run (same size, steps
        and sampler), waiting at most `batch_wait_s` for companions; [] once stopped and drained."""
        with self._wakeup:
            self._wakeup.wait_for(lambda: self._pending or self._stopping)
            if not self._pending:
                return []
            batch = [self._pending.popleft()]
            pictures = len(batch[0].request.control_images)
            deadline = time.monotonic() + self._batch_wait_s
            while pictures < self._max_batch:
                for item in list(self._pending):
                    fits = pictures + len(item.request.control_images) <= self._max_batch
                    if fits and _batch_key(item.request) == _batch_key(batch[0].request):
                        self._pending.remove(item)
                        batch.append(item)
                        pictures += len(item.request.control_images)
                remaining = deadline - time.monotonic()
                if pictures >= self._max_batch or remaining <= 0 or self._stopping:
                    break
                self._wakeup.wait(remaining)
            return batch

    def _fail_queued(self) -> None:
        with self._wakeup:
            items, self._pending = list(self._pending), deque()
        for item in items:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(ModelNotReady("The model failed to load; see the server log."))

    def _serve(self, batch: list[_Item]) -> None:
        names = ", ".join(item.request.request_id for item in batch)
        try:
            outcomes = self._service.run_batch([item.request for item in batch], [item.on_step for item in batch])
        except GenerationCanceled as exc:
            log.info("requests %s: canceled while running", names)
            outcomes = [exc] * len(batch)
        except torch.OutOfMemoryError:
            log.exception("requests %s: out of GPU memory", names)
            _free_gpu_memory()
            error = GenerationOutOfMemory(
                "The GPU ran out of memory for this request; retry with a lower resolution or fewer GIF frames.",
                retry_after=5,
            )
            outcomes = [error] * len(batch)
        except Exception as exc:
            log.exception("requests %s: generation failed", names)
            outcomes = [
                GenerationFailed(
                    f"Generation failed ({type(exc).__name__}); the server logged the details under "
                    f"request id {item.request.request_id}."
                )
                for item in batch
            ]
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
                continue
            self._average_seconds = 0.8 * self._average_seconds + 0.2 * outcome.seconds
            for observer in self._observers:
                try:
                    observer(item.request, outcome)
                except Exception:
                    log.exception("a result observer failed")
            item.future.set_result(outcome)


@dataclass(frozen=True, eq=False)
class _Item:
    """A queued request; items compare by identity, so two equal requests are still two places."""

    request: GenerationRequest
    on_step: ProgressCallback | None
    future: Future


def _batch_key(request: GenerationRequest) -> tuple:
    return (request.size, request.steps, request.scheduler)


def _free_gpu_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
