"""The generation service of a web process when QUEUE_BACKEND=celery: it decodes the upload, makes the
edge maps and keeps the upload here, queues a Celery task for the GPU workers, follows the task's
replies (events, then the output) from Redis and saves the output here. No model, no torch."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial

import redis
from PIL import Image
from pydantic import BaseModel

from service import errors
from service.distributed import wire
from service.distributed.celery_app import GENERATE_TASK, make_celery
from service.distributed.ledger import Ledger, QueueUnreachable, connect, reachable
from service.interface import Generated, GenerationService, ResultObserver, ServiceState, Submission, process_name
from service.local import upload_desk
from service.settings import Settings
from service.storage import UntrustedName, stored_file, write_atomically
from stable_diffusion.recipe import EventHandler, Started, Stepped

log = logging.getLogger(__name__)
# How long a follower blocks for the next reply before it looks whether it should stop.
POLL_S = 1


class CeleryGenerationService(GenerationService):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._ledger = Ledger(
            connect(settings.redis_url),
            settings.queue_size,
            settings.max_queued_per_key,
            horizon_s=max(settings.generation_timeout_s, settings.task_visibility_timeout_s) * 2,
        )
        self._celery = make_celery(settings)
        self._uploads = upload_desk(settings)
        self._output_dir = settings.output_dir
        self._output_dir.mkdir(parents=True, exist_ok=True)
        self._observers: list[ResultObserver] = []
        self._followers: dict[str, tuple[threading.Thread, Future]] = {}
        self._closing = threading.Event()
        self._name = process_name()

    @property
    def state(self) -> ServiceState:
        try:
            states = {worker["state"] for worker in self._ledger.workers()}
        except QueueUnreachable:
            return ServiceState.UNREACHABLE
        for state in (ServiceState.READY, ServiceState.WARMING_UP, ServiceState.LOADING):
            if state in states:
                return state
        return ServiceState.NO_WORKERS

    @property
    def queue_depth(self) -> int:
        try:
            return self._ledger.queue_depth()
        except QueueUnreachable:
            return 0

    @property
    def queue_size(self) -> int:
        return self._settings.queue_size

    def gpu_workers(self) -> list[dict]:
        try:
            return self._ledger.workers()
        except QueueUnreachable:
            return []

    def admit(self, owner: str) -> None:
        self._ledger.check(owner)

    @contextmanager
    def counted(self, owner: str) -> Iterator[None]:
        marker = f"preprocess-{time.monotonic_ns()}-{threading.get_ident()}"
        self._ledger.reserve(owner, marker, queue=False)
        try:
            yield
        finally:
            self._ledger.release(owner, marker)

    def submit(
        self, fields: BaseModel, upload: bytes, owner: str, request_id: str, on_event: EventHandler | None = None
    ) -> Submission:
        with reachable():
            self._ledger.hold(request_id, self._name)
        prepared = self._uploads.prepare(fields, upload, request_id)
        try:
            self._ledger.reserve(owner, request_id)
        except errors.ServiceError:
            self._uploads.discard(prepared)
            raise
        message = wire.request_message(prepared.request, prepared.upload, owner, prepared.stem, on_event is not None)
        # A waiting client (no event handler: /generate) gives up after GENERATION_TIMEOUT_S; its task is not run
        # later for nobody. A job's task waits as long as it takes for a GPU worker.
        expires = self._settings.generation_timeout_s if on_event is None else None
        try:
            with reachable():
                self._celery.send_task(GENERATE_TASK, args=[message], task_id=request_id, expires=expires)
        except Exception:
            self._ledger.release(owner, request_id)
            self._uploads.discard(prepared)
            raise
        future = self._start_following(request_id, owner, on_event)
        request = prepared.request
        cancel = partial(self.cancel, request_id, owner)
        return Submission(request_id, request.seed, request.size, prepared.input_file, future, cancel)

    def adopt(self, request_id: str, owner: str, on_event: EventHandler | None = None) -> Future | None:
        try:
            if request_id in self._followers or not self._ledger.hold(request_id, self._name, first=True):
                return None
        except (redis.ConnectionError, redis.TimeoutError):
            return None
        log.info("request %s: its web process stopped following it; this one does now", request_id)
        return self._start_following(request_id, owner, on_event)

    def _start_following(self, request_id: str, owner: str, on_event: EventHandler | None) -> Future:
        future = _RemoteFuture(self._ledger, request_id, owner)
        follower = threading.Thread(
            target=self._follow, args=(future, request_id, owner, on_event), name=f"follow-{request_id}", daemon=True
        )
        self._followers[request_id] = (follower, future)
        follower.start()
        return future

    def edge_map(self, fields: BaseModel, upload: bytes) -> bytes:
        return self._uploads.edge_map(fields, upload)

    def position(self, request_id: str) -> int | None:
        try:
            return self._ledger.position(request_id)
        except QueueUnreachable:
            return None

    def cancel(self, request_id: str, owner: str) -> bool:
        followed = self._followers.get(request_id)
        if followed is not None and followed[1].cancel():
            return True
        return self._ledger.cancel(request_id, owner)

    def describe(self) -> dict[str, object]:
        ready = [worker for worker in self._ledger.workers() if worker["state"] == ServiceState.READY]
        if not ready:
            raise errors.ModelNotReady(self.state.not_ready_message, retry_after=5)
        return ready[0]["about"] | {"gpu_workers": len(ready)}

    def observe(self, observer: ResultObserver) -> None:
        self._observers.append(observer)

    def close(self, timeout: float | None = None) -> None:
        """Stop following at once: GPU workers run what was queued whatever happens here, and the replies
        wait in Redis for the web process that adopts the jobs (a /generate client has had its answer by now)."""
        self._closing.set()
        for follower, _ in list(self._followers.values()):
            follower.join(POLL_S + 1)

    def _follow(self, future: Future, request_id: str, owner: str, on_event: EventHandler | None) -> None:
        """Hand the task's replies to `on_event` and `future` until its output or error arrives."""
        preview = _LatestPreview()
        try:
            while not future.done() and not self._closing.is_set():
                try:
                    if not self._ledger.renew_hold(request_id, self._name):
                        # Another web process took the request over (this one stalled past its lease).
                        log.warning("request %s: another web process follows it now", request_id)
                        return
                    reply = self._ledger.next_reply(request_id, POLL_S)
                except (redis.ConnectionError, redis.TimeoutError):
                    # Redis is away: keep waiting (a waiting client times out by itself).
                    time.sleep(POLL_S)
                    continue
                if reply is not None:
                    self._take(reply, future, request_id, on_event, preview)
        except Exception:
            log.exception("request %s: following its task failed", request_id)
            if not future.done():
                future.set_exception(errors.GenerationFailed(
                    f"Generation failed; the server logged the details under request id {request_id}."
                ))
        finally:
            self._followers.pop(request_id, None)
            # Unfinished (this process stops, or another took over): its replies stay for the one who adopts it.
            if future.done():
                try:
                    self._ledger.release(owner, request_id)
                    self._ledger.forget(request_id)
                except (redis.ConnectionError, redis.TimeoutError):
                    pass

    def _take(self, message: object, future: Future, request_id: str, on_event, preview: _LatestPreview) -> None:
        try:
            reply = wire.read_reply(message)
            if isinstance(reply, wire.Done):
                self._save(reply, future)
            elif isinstance(reply, wire.Failed):
                error_type = getattr(errors, reply.error, None)
                if not (isinstance(error_type, type) and issubclass(error_type, errors.ServiceError)):
                    error_type = errors.GenerationFailed
                future.set_exception(error_type(reply.message, retry_after=reply.retry_after))
            elif isinstance(reply, wire.Started):
                # Again when a task comes back from a GPU worker that died: the job simply starts over.
                if not future.running() and not future.set_running_or_notify_cancel():
                    return
                self._notify(on_event, Started(reply.total), request_id)
            else:
                preview.update(wire.read_preview(reply))
                self._notify(on_event, Stepped(reply.step, reply.total, preview.latest), request_id)
        except (wire.UntrustedMessage, UntrustedName) as exc:
            log.warning("request %s: refused a reply from Redis: %s", request_id, exc)
            if not future.done():
                future.set_exception(errors.GenerationFailed(
                    f"Generation failed; the server logged the details under request id {request_id}."
                ))

    def _save(self, reply: wire.Done, future: Future) -> None:
        """The output in OUTPUT_DIR under the name this service gave it, never over a file already there."""
        output = wire.read_output(reply)
        path = stored_file(self._output_dir, output.file_name)
        if path.exists() and path.read_bytes() != output.data:
            raise UntrustedName(f"{output.file_name} exists already, with other bytes")
        try:
            write_atomically(path, output.data)
        except errors.ServiceError as error:
            future.set_exception(error)
            return
        for observer in self._observers:
            observer(Generated(output.seconds, reply.images))
        future.set_result(output)

    def _notify(self, on_event: EventHandler | None, event, request_id: str) -> None:
        if on_event is None:
            return
        try:
            on_event(event)
        except errors.GenerationCanceled:
            self._ledger.cancel(request_id, owner="")


class _RemoteFuture(Future):
    """A queued task's future: canceling it also tells the GPU workers, so the task never runs."""

    def __init__(self, ledger: Ledger, request_id: str, owner: str) -> None:
        super().__init__()
        self._ledger, self._request_id, self._owner = ledger, request_id, owner

    def cancel(self) -> bool:
        canceled = super().cancel()
        if canceled:
            try:
                self._ledger.cancel(self._request_id, self._owner)
            except QueueUnreachable:
                log.warning("request %s: canceled, but Redis is unreachable to tell the GPU workers", self._request_id)
        return canceled


class _LatestPreview:
    """The last preview a GPU worker sent (they send one at most once a second)."""

    def __init__(self) -> None:
        self._image: Image.Image | None = None

    def update(self, image: Image.Image | None) -> None:
        if image is not None:
            self._image = image

    def latest(self) -> Image.Image:
        return self._image if self._image is not None else Image.new("RGB", (64, 64), "gray")
