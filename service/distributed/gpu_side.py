"""The GPU worker's side of a generation task: it feeds the task to this process's GenerationWorker (so
tasks that arrive together share one denoising run), stops a run whose request was canceled, and records
what happens: a job's life in the shared job store (through the recording code local mode uses), a /generate
request's answer for the web process that waits for it. The worker owns its jobs' state; no web process
needs to live for a job to finish."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

import redis

from service.distributed import wire
from service.distributed.celery_app import QUEUE
from service.distributed.ledger import Ledger
from service.errors import GenerationCanceled, GenerationFailed, InvalidField, QueueUnreachable, ServiceError
from service.fields import generate_fields_model, parse_fields
from service.interface import Generated, RenderedOutput, ServiceState, process_name
from service.jobs.recording import CANCELED_QUEUED, JobRecorder
from service.jobs.redis_store import RedisJobStore
from service.rendering import format_loras, render_output
from service.settings import Settings
from service.worker import GenerationWorker
from stable_diffusion.errors import first_line
from stable_diffusion.image_processing import DecodedImage
from stable_diffusion.recipe import GenerationEvent, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)
HEARTBEAT_S = 3
# A claim passes to another worker once its holder's heartbeat has not changed (or been there) for this long: a
# live holder beats every HEARTBEAT_S, and again within HEARTBEAT_S of a Redis restart.
TAKE_OVER_AFTER_S = 2 * HEARTBEAT_S
# A task's fields that the web tier's limits bound (the LoRAs too, checked apart).
CHECKED_FIELDS = (
    "prompt", "negative_prompt", "sensitivity", "seed", "steps", "guidance_scale", "control_start", "control_end",
    "refine_strength", "scheduler", "progress_gif",
)
# How long an outcome waits for Redis to come back (a restart) before it is given up, logged.
OUTCOME_PATIENCE_S = 300


class GpuRunner:
    def __init__(
        self, worker: GenerationWorker, ledger: Ledger, jobs: RedisJobStore, settings: Settings, node: str = ""
    ) -> None:
        """`node`: Celery's name for this worker."""
        self.worker, self.ledger, self.jobs, self.device, self.node = worker, ledger, jobs, settings.device, node
        self._settings = settings
        # The limits the web tier applies: a task read from Redis is checked against them again.
        self._fields = generate_fields_model(settings)
        self.name = process_name()
        self._stopped = threading.Event()
        # Requests this process runs (its heartbeat says how many).
        self._running: set[str] = set()
        self._images = 0
        # When a call to Redis last failed (its restarts and hangs stop the clocks claims are taken over by).
        self._redis_failed_at = 0.0
        # The copy of each request that waits for its claim; a newer copy sets the older one's event.
        self._copies: dict[str, threading.Event] = {}
        worker.observe(self._generated)
        self._heart = threading.Thread(target=self._beat, name="gpu-heartbeat", daemon=True)
        self._heart.start()

    def run(self, message: object) -> None:
        """One Celery task: returns once its outcome is recorded (a job) or answered (/generate)."""
        try:
            request, upload, owner, stem, job = wire.read_request(message, self._settings.max_gif_frames)
            self._check(request)
        except Exception as refusal:  # anything a task can hold: whatever fails, it is refused, never run
            self._refuse(message, refusal)
            return
        request_id = request.request_id
        recorder = JobRecorder(self.jobs, request_id) if job else None
        if self._persist(partial(self.ledger.canceled, request_id)):
            log.info("request %s: canceled before it ran", request_id)
            self._conclude(request_id, recorder, _failed_future(GenerationCanceled(CANCELED_QUEUED)), owner)
            return
        if not self._claim(request_id):
            return
        self._persist(partial(self.ledger.left_queue, request_id))
        on_event = partial(self._on_event, request_id, recorder)
        try:
            finish = partial(self._render, request, upload, stem)
            future = self.worker.submit(request, on_event, owner=owner, finish=finish)
            future.exception()  # waits
        except ServiceError as error:
            future = _failed_future(error)
        finally:
            self._running.discard(request_id)
        self._conclude(request_id, recorder, future, owner)

    def _conclude(self, request_id: str, recorder: JobRecorder | None, future: Future, owner: str | None) -> None:
        """Record a job's outcome, or answer a /generate request; then mark the request finished (a copy of its
        task that Redis hands out again is dropped) and give its place in the queue and its key's count back."""
        error = future.exception()
        log.info("request %s: %s", request_id, "done" if error is None else f"failed ({type(error).__name__})")
        try:
            try:
                self._answer(request_id, recorder, future)
            except Exception:  # Redis refusing the write (out of memory, read-only...): say it failed, if it can
                log.exception("request %s: its outcome could not be recorded", request_id)
                self._answer(request_id, recorder, _failed_future(GenerationFailed(
                    f"Generation finished, but its outcome could not be stored; the GPU worker logged the details "
                    f"under request id {request_id}."
                )))
        finally:
            self._persist(partial(self.ledger.finish, request_id))
            if owner is not None:
                self._persist(partial(self.ledger.release, owner, request_id))

    def _answer(self, request_id: str, recorder: JobRecorder | None, future: Future) -> None:
        error = future.exception()
        if recorder is not None:
            self._persist(partial(recorder.finished, future))
        elif error is None:
            self._persist(partial(self.ledger.reply, request_id, wire.done(future.result())))
        else:
            if not isinstance(error, ServiceError):
                error = GenerationFailed(
                    f"Generation failed; the GPU worker logged the details under request id {request_id}."
                )
            self._persist(partial(self.ledger.reply, request_id, wire.failed(error)))

    def _persist(self, write: Callable[[], object]) -> object:
        """`write` to Redis, again and again while Redis restarts, for up to OUTCOME_PATIENCE_S (then its error)."""
        deadline = time.monotonic() + OUTCOME_PATIENCE_S
        while True:
            try:
                return write()
            except (redis.ConnectionError, redis.TimeoutError, QueueUnreachable):
                self._redis_failed_at = time.monotonic()
                if time.monotonic() > deadline:
                    log.error("Redis stayed out of reach for %d s; gave up", OUTCOME_PATIENCE_S)
                    raise
                time.sleep(1)

    def _check(self, request: GenerationRequest) -> None:
        """InvalidField unless the request is one the web tier's fields allow: a GPU worker runs nothing a
        caller could not have asked for (steps, sizes, LoRAs...), whoever wrote the task into Redis."""
        values = {name: getattr(request, name) for name in CHECKED_FIELDS}
        parse_fields(self._fields, values | {"loras": format_loras(request.loras)})
        largest, sizes = self._settings.max_resolution, {image.size for image in request.control_images}
        if len(sizes) != 1 or any(side % 8 or not 8 <= side <= largest for side in next(iter(sizes))):
            raise InvalidField(f"edge maps must share one size, each side a multiple of 8 up to {largest}")

    def _refuse(self, message: object, refusal: Exception) -> None:
        """Logged; the request's job or waiting web process hears why (a web host and a GPU host set up with
        different limits land here too), and its place in the queue and its key's count are given back."""
        reason = refusal.message if isinstance(refusal, ServiceError) else first_line(refusal)
        envelope = message if isinstance(message, dict) else {}
        request = envelope.get("request")
        request_id = request.get("request_id") if isinstance(request, dict) else None
        log.warning("refused a task (request %.64r): %s", request_id, reason)
        if isinstance(request_id, str) and 0 < len(request_id) <= 200:
            recorder = JobRecorder(self.jobs, request_id) if envelope.get("job") is True else None
            owner = envelope.get("owner")
            refused = InvalidField(f"The GPU worker refused the request: {reason}")
            self._conclude(request_id, recorder, _failed_future(refused), owner if isinstance(owner, str) else None)

    def _claim(self, request_id: str) -> bool:
        """Redis hands a task out again when it ran longer than TASK_VISIBILITY_TIMEOUT_S, its worker died, or
        Redis restarted. Run it only when no live worker holds it: wait while one does (its heartbeat beats);
        take it over from one whose heartbeat stood still for TAKE_OVER_AFTER_S; drop it once it finished."""
        # Each copy that comes back holds a Celery thread while it waits: only the newest waits (the older
        # ones' deliveries went back to the queue when it was handed out, so they have nothing to keep).
        newest, older = threading.Event(), self._copies.get(request_id)
        self._copies[request_id] = newest
        if older is not None:
            older.set()
        try:
            if not self._wait_for_claim(request_id, newest):
                return False
        finally:
            if self._copies.get(request_id) is newest:
                del self._copies[request_id]
        self._running.add(request_id)
        return True

    def _wait_for_claim(self, request_id: str, newest: threading.Event) -> bool:
        # The holder's heartbeat as last seen, and since when it has not changed.
        seen: tuple[bytes | None, float] | None = None
        while not newest.is_set():
            if self._persist(partial(self.ledger.finished, request_id)):
                log.info("request %s: already finished by another worker", request_id)
                return False
            holder = self._persist(partial(self.ledger.claim, request_id, self.name))
            if holder is None:
                return True
            beat = None if holder == self.name else self._persist(partial(self.ledger.heartbeat, holder))
            # Not seen changing since Redis was last out of reach says nothing: the holder may not have beaten yet.
            if holder == self.name or seen is None or beat != seen[0] or seen[1] <= self._redis_failed_at:
                seen = (beat, time.monotonic())
            elif time.monotonic() - seen[1] >= TAKE_OVER_AFTER_S:
                if self._persist(partial(self.ledger.take_over, request_id, holder, self.name)):
                    log.info("request %s: taken over from %s, whose heartbeat stopped", request_id, holder)
                    return True
            newest.wait(1)
        return False

    def stop(self, timeout: float | None = None) -> None:
        self._stopped.set()
        self.worker.close(timeout)

    def _on_event(self, request_id: str, recorder: JobRecorder | None, event: GenerationEvent) -> None:
        """On the GPU thread, at every step: stop a canceled request; record a job's progress. Redis out of
        reach (a restart) costs the run nothing: it goes on, and its outcome waits for Redis."""
        try:
            canceled = self.ledger.canceled(request_id)
            if recorder is not None and not canceled:
                recorder.on_event(event)
        except (redis.ConnectionError, redis.TimeoutError, QueueUnreachable):
            return
        if canceled:
            raise GenerationCanceled("Canceled while running.")

    def _render(
        self, request: GenerationRequest, upload: DecodedImage, stem: str, result: GenerationResult
    ) -> RenderedOutput:
        return render_output(request, result, upload, self.worker.runner, stem, self.name)

    def _generated(self, generated: Generated) -> None:
        self._images += generated.images
        try:
            self.ledger.record_seconds(generated.seconds)
        except (redis.ConnectionError, redis.TimeoutError, QueueUnreachable):
            pass

    def _beat(self) -> None:
        while not self._stopped.is_set():
            state = self.worker.state
            about = None
            if state == ServiceState.READY:
                about = self.worker.runner.describe()
            try:
                self.ledger.beat(self.name, {
                    "name": self.name, "node": self.node, "queue": QUEUE, "state": state, "device": self.device,
                    "about": about, "beat": time.time_ns(),
                    "running": len(self._running), "images": self._images,
                })
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("the heartbeat could not reach Redis (%s); retrying", exc)
            except Exception:  # Redis refusing writes (out of memory...): the heartbeat must go on regardless
                log.exception("the heartbeat failed; retrying")
            self._stopped.wait(HEARTBEAT_S)


def _failed_future(error: Exception) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future
