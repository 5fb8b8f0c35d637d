"""The one thread that owns the GPU: it loads the model runner, then serves a bounded queue of generation
requests in batches. Each request's future is answered once its result is finished (rendered and saved)
on a small pool beside that thread, so that the GPU never waits for PNG encoding or the disk.

It imports no torch: the model runner comes from the `load` function it is given."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from service.admission import FIRST_GUESS_S, key_share_used, queue_full, running_average
from service.errors import GenerationCanceled, GenerationFailed, ModelNotReady, ServiceError
from service.interface import Generated, ResultObserver, ServiceState
from stable_diffusion.recipe import Canceled, EventHandler, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)
# Threads that finish results (render, save): more than one, so that a slow disk holds up one request only.
FINISHERS = 4


class ModelRunner(Protocol):
    """What the GPU thread runs: stable_diffusion.pipeline_runner.PipelineRunner, or a test's stand-in."""

    model_name: str
    model_hash: str | None

    def warm_up(self) -> None: ...

    def run_batch(
        self, requests: list[GenerationRequest], on_events: list[EventHandler | None]
    ) -> list[GenerationResult | Canceled]: ...

    def describe(self) -> dict[str, object]: ...


def unchanged(result: GenerationResult) -> GenerationResult:
    return result


class GenerationWorker:
    def __init__(
        self,
        load: Callable[[], ModelRunner],
        queue_size: int,
        on_load_failed: Callable[[Exception], None] | None = None,
        max_per_owner: int | None = None,
        max_batch: int = 1,
        batch_wait_s: float = 0.0,
    ) -> None:
        self.state = ServiceState.LOADING
        self.load_error: Exception | None = None
        self._load, self._on_load_failed = load, on_load_failed
        self._runner: ModelRunner | None = None
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
        self._average_seconds = FIRST_GUESS_S
        # Running requests asked to stop: their next event raises GenerationCanceled.
        self._cancel_requested: set[str] = set()
        self._finisher = ThreadPoolExecutor(FINISHERS, thread_name_prefix="generation-finisher")
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._thread.start()

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise ModelNotReady(self.state.not_ready_message, retry_after=5)
        return self._runner

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def queue_size(self) -> int:
        return self._queue_size

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        """True once the model is loaded; False on timeout or when loading failed."""
        return self._loaded.wait(timeout) and self.state == ServiceState.READY

    def observe(self, observer: ResultObserver) -> None:
        self._observers.append(observer)

    def submit(
        self,
        request: GenerationRequest,
        on_event: EventHandler | None = None,
        owner: str = "",
        finish: Callable[[GenerationResult], object] = unchanged,
    ) -> Future:
        """Queue a request (also while the model loads); its future is answered with `finish(result)`.
        Raises at once rather than waiting for room: QueueFull when the queue is full, TooManyRequests
        when `owner` already has its share in it."""
        future: Future = Future()
        with self._wakeup:
            self._check_room(owner)
            item = _Item(request, on_event, future, finish)
            self._pending.append(item)
            self._per_owner[owner] += 1
            self._wakeup.notify()
        future.add_done_callback(lambda _: self._release(owner, item))
        return future

    def check_room(self, owner: str = "") -> None:
        """Raise now what `submit` would raise for `owner`."""
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
        if not self.state.takes_work:
            raise ModelNotReady(self.state.not_ready_message)
        self._check_owner(owner)
        if len(self._pending) >= self._queue_size:
            raise queue_full(self._queue_size, self._average_seconds * self._queue_size / self._max_batch)

    def _check_owner(self, owner: str) -> None:
        if self._per_owner[owner] >= self._max_per_owner:
            raise key_share_used(self._per_owner[owner], self._average_seconds)

    def _release(self, owner: str, item: _Item | None = None) -> None:
        """When a request ends, its key's count drops; a request canceled while queued (a job's cancel,
        a /generate that timed out) also gives its place in the queue back now, not when its turn comes."""
        with self._wakeup:
            self._per_owner[owner] -= 1
            if not self._per_owner[owner]:
                del self._per_owner[owner]
            if item is not None and item in self._pending:
                self._pending.remove(item)

    def position(self, request_id: str) -> int | None:
        """How many requests wait ahead of this one (0: next), or None once it left the queue."""
        with self._wakeup:
            waiting = [item.request.request_id for item in self._pending]
        return waiting.index(request_id) if request_id in waiting else None

    def cancel(self, request_id: str) -> bool:
        """A queued request leaves the queue now (True); a running one stops at its next step (False)."""
        with self._wakeup:
            queued = [item for item in self._pending if item.request.request_id == request_id]
            if not queued:
                self._cancel_requested.add(request_id)
        return any([item.future.cancel() for item in queued])

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, results saved, then stop the threads."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)
        self._finisher.shutdown(wait=True)

    def _run(self) -> None:
        # Loading here, on the thread that runs every generation, keeps all torch work on one thread.
        try:
            self._runner = self._load()
            self.state = ServiceState.WARMING_UP
            self._runner.warm_up()
        except Exception as exc:
            self._runner = None
            self.state, self.load_error = ServiceState.FAILED, exc
            self._loaded.set()
            self._fail_queued()
            if self._on_load_failed is not None:
                self._on_load_failed(exc)
            return
        self.state = ServiceState.READY
        self._loaded.set()
        while batch := self._next_batch():
            running = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if running:
                self._serve(running)
        self.state = ServiceState.STOPPED

    def _next_batch(self) -> list[_Item]:
        """The oldest request, with the queued ones that can share its denoising run (same size, steps,
        sampler and LoRAs), waiting at most `batch_wait_s` for companions; [] once stopped and drained."""
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
                item.future.set_exception(ModelNotReady(ServiceState.FAILED.not_ready_message))

    def _serve(self, batch: list[_Item]) -> None:
        names = ", ".join(item.request.request_id for item in batch)
        if len(batch) > 1:
            log.info("requests %s share one run", names)
        try:
            outcomes = self._runner.run_batch(
                [item.request for item in batch], [self._events_of(item) for item in batch]
            )
        except ServiceError as error:
            # Out of GPU memory: the model runner said so in a message for the caller.
            outcomes = [error] * len(batch)
        except Exception as exc:
            log.exception("requests %s: generation failed", names)
            outcomes = [_failed(item.request, exc) for item in batch]
        self._cancel_requested.difference_update(item.request.request_id for item in batch)
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Canceled):
                log.info("request %s: canceled while running", item.request.request_id)
                outcome = GenerationCanceled(outcome.message)
            if isinstance(outcome, Exception):
                item.future.set_exception(outcome)
                continue
            self._average_seconds = running_average(self._average_seconds, outcome.seconds)
            for observer in self._observers:
                try:
                    observer(Generated(outcome.seconds, len(outcome.images)))
                except Exception:
                    log.exception("a result observer failed")
            self._finisher.submit(_finish, item, outcome)


    def _events_of(self, item: _Item) -> EventHandler:
        """The request's own handler, after a check that nobody asked it to stop."""

        def on_event(event) -> None:
            if item.request.request_id in self._cancel_requested:
                raise GenerationCanceled("Canceled while running.")
            if item.on_event is not None:
                item.on_event(event)

        return on_event


def _finish(item: _Item, result: GenerationResult) -> None:
    try:
        item.future.set_result(item.finish(result))
    except ServiceError as error:
        item.future.set_exception(error)
    except Exception as exc:
        log.exception("request %s: finishing the result failed", item.request.request_id)
        item.future.set_exception(_failed(item.request, exc, "Saving the result"))


def _failed(request: GenerationRequest, exc: Exception, what: str = "Generation") -> GenerationFailed:
    return GenerationFailed(
        f"{what} failed ({type(exc).__name__}); the server logged the details under request id {request.request_id}."
    )


@dataclass(frozen=True, eq=False)
class _Item:
    """A queued request; items compare by identity, so two equal requests are still two places."""

    request: GenerationRequest
    on_event: EventHandler | None
    future: Future
    finish: Callable[[GenerationResult], object]


def _batch_key(request: GenerationRequest) -> tuple:
    """Requests share a denoising run when these agree; the LoRA set too, so that no request's picture
    depends on its companions."""
    return (request.size, request.steps, request.scheduler, request.loras)
