"""The generation service of a web process when QUEUE_BACKEND=celery: it decodes the upload, makes the
edge maps and keeps the upload here, and queues a Celery task for the GPU workers. A job is then the GPU
worker's: it records the job's life in the shared job store, where any web process reads it. A /generate
request waits here for its answer (a blocking read on one Redis key) and saves the output here. No model,
no torch."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial

import redis
from kombu.exceptions import KombuError
from pydantic import BaseModel

from service import errors
from service.distributed import wire
from service.distributed.celery_app import GENERATE_TASK, make_celery
from service.distributed.ledger import Ledger
from service.interface import Description, Generated, GenerationService, ResultObserver, ServiceState, Submission
from service.jobs.recording import JobRecorder
from service.local import upload_desk
from service.redis_connection import WEB_TIMEOUT_S, connect, reachable
from service.settings import Settings
from service.storage import UntrustedName, stored_file, write_atomically
from service.uploads import Prepared

log = logging.getLogger(__name__)
# How long one blocking read for an answer lasts before the waiter looks whether it should stop.
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
        # Blocking reads need a socket timeout longer than the read.
        self._answers = connect(settings.redis_url, timeout_s=POLL_S + 5)
        self._celery = make_celery(settings)
        # Publishing gives up as the other calls to Redis do (kombu waits for ever by default).
        self._celery.conf.broker_transport_options |= {
            "socket_timeout": WEB_TIMEOUT_S * 2, "socket_connect_timeout": WEB_TIMEOUT_S * 2,
        }
        self._uploads = upload_desk(settings)
        self._output_dir = settings.output_dir
        self._output_dir.mkdir(parents=True, exist_ok=True)
        self._observers: list[ResultObserver] = []
        # /generate requests waiting for their answer.
        self._waiting: dict[str, Future] = {}
        self._closing = threading.Event()

    @property
    def state(self) -> ServiceState:
        try:
            states = {worker["state"] for worker in self._ledger.workers()}
        except errors.QueueUnreachable:
            return ServiceState.UNREACHABLE
        for state in (ServiceState.READY, ServiceState.WARMING_UP, ServiceState.LOADING):
            if state in states:
                return state
        return ServiceState.NO_WORKERS

    @property
    def queue_depth(self) -> int:
        try:
            return self._ledger.queue_depth()
        except errors.QueueUnreachable:
            return 0

    @property
    def queue_size(self) -> int:
        return self._settings.queue_size

    def gpu_workers(self) -> list[dict]:
        try:
            return self._ledger.workers()
        except errors.QueueUnreachable:
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

    def submit(self, fields: BaseModel, upload: bytes, owner: str, request_id: str) -> Submission:
        prepared = self._uploads.prepare(fields, upload, request_id)
        future: Future = Future()
        self._waiting[request_id] = future
        try:
            # A waiting client gives up after GENERATION_TIMEOUT_S; its task is not run later for nobody.
            self._send(prepared, owner, job=False, expires=self._settings.generation_timeout_s)
        except Exception:
            self._waiting.pop(request_id, None)
            raise
        threading.Thread(
            target=self._await_answer, args=(future, request_id, prepared.stem), name=f"answer-{request_id}",
            daemon=True,
        ).start()
        request = prepared.request
        cancel = partial(self.cancel, request_id, owner)
        return Submission(request_id, request.seed, request.size, prepared.input_file, future, cancel)

    def submit_job(self, fields: BaseModel, upload: bytes, owner: str, recorder: JobRecorder) -> None:
        prepared = self._uploads.prepare_job(fields, upload, recorder)
        # A job's task waits as long as it takes for a GPU worker.
        self._send(prepared, owner, job=True, expires=None)

    def _send(self, prepared: Prepared, owner: str, job: bool, expires: float | None) -> None:
        """Count the request against the queue and its key, and queue its task; refused, it leaves no file."""
        request_id = prepared.request.request_id
        try:
            self._ledger.reserve(owner, request_id)
        except errors.ServiceError:
            self._uploads.discard(prepared)
            raise
        message = wire.request_message(prepared.request, prepared.upload, owner, prepared.stem, job)
        try:
            with reachable():
                try:
                    self._celery.send_task(GENERATE_TASK, args=[message], task_id=request_id, expires=expires)
                except (KombuError, OSError) as exc:  # kombu's own errors for a broker out of reach
                    raise redis.ConnectionError(str(exc)) from exc
        except Exception:
            try:
                self._ledger.release(owner, request_id)
            finally:
                self._uploads.discard(prepared)
            raise

    def edge_map(self, fields: BaseModel, upload: bytes) -> bytes:
        return self._uploads.edge_map(fields, upload)

    def position(self, request_id: str) -> int | None:
        try:
            return self._ledger.position(request_id)
        except errors.QueueUnreachable:
            return None

    def cancel(self, request_id: str, owner: str) -> bool:
        waiting = self._waiting.get(request_id)
        if waiting is not None:
            waiting.cancel()
        return self._ledger.cancel(request_id, owner)

    def describe(self) -> Description:
        ready = [worker["about"] for worker in self._ledger.workers()
                 if worker["state"] == ServiceState.READY and worker["about"] is not None]
        if not ready:
            raise errors.ModelNotReady(self.state.not_ready_message, retry_after=5)
        return Description.model_validate(ready[0] | {"gpu_workers": len(ready)})

    def observe(self, observer: ResultObserver) -> None:
        """Hears of the /generate requests this process answers (GPU workers count every image they make)."""
        self._observers.append(observer)

    def close(self, timeout: float | None = None) -> None:
        """Stop waiting: GPU workers run what was queued whatever happens here, and record their jobs (a
        /generate client has had its answer by now)."""
        self._closing.set()

    def _await_answer(self, future: Future, request_id: str, stem: str) -> None:
        """Read the request's answer from Redis (one key, written by the GPU worker that ran it) into `future`."""
        try:
            while not future.done() and not self._closing.is_set():
                try:
                    answer = self._ledger.next_reply(self._answers, request_id, POLL_S)
                except (redis.ConnectionError, redis.TimeoutError):
                    # Redis is away: keep waiting (the client gives up by itself after GENERATION_TIMEOUT_S).
                    time.sleep(POLL_S)
                    continue
                if answer is not None:
                    self._take(answer, future, request_id, stem)
        except Exception:
            log.exception("request %s: waiting for its answer failed", request_id)
            _fail(future, request_id)
        finally:
            self._waiting.pop(request_id, None)

    def _take(self, answer: object, future: Future, request_id: str, stem: str) -> None:
        try:
            reply = wire.read_reply(answer)
            if isinstance(reply, wire.Done):
                self._save(reply, future, stem)
                return
            error_type = getattr(errors, reply.error, None)
            if not (isinstance(error_type, type) and issubclass(error_type, errors.ServiceError)):
                error_type = errors.GenerationFailed
            _settle(future, exception=error_type(reply.message, retry_after=reply.retry_after))
        except (wire.UntrustedMessage, UntrustedName) as exc:
            log.warning("request %s: refused an answer from Redis: %s", request_id, exc)
            _fail(future, request_id)

    def _save(self, reply: wire.Done, future: Future, stem: str) -> None:
        """The output in OUTPUT_DIR under the name this process gave it (`stem`), never over a file already
        there, and only while its client waits."""
        output = wire.read_output(reply)
        path = stored_file(self._output_dir, output.file_name)
        if path.stem != stem:
            raise UntrustedName(f"{output.file_name} is not the name given to this request ({stem}.*)")
        if path.exists():
            raise UntrustedName(f"{output.file_name} exists already")
        if future.cancelled():
            return
        try:
            write_atomically(path, output.data)
        except errors.ServiceError as error:
            _settle(future, exception=error)
            return
        for observer in self._observers:
            observer(Generated(output.seconds, output.images))
        _settle(future, result=output)


def _settle(future: Future, result: object = None, exception: BaseException | None = None) -> None:
    """Answer `future`, unless its client gave up (it was canceled) meanwhile."""
    if not future.set_running_or_notify_cancel():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)


def _fail(future: Future, request_id: str) -> None:
    if not future.done():
        _settle(future, exception=errors.GenerationFailed(
            f"Generation failed; the server logged the details under request id {request_id}."
        ))
