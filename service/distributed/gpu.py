"""The GPU worker's side of a generation task: it feeds the task to this process's GenerationWorker (so
tasks that arrive together share one denoising run), sends the run's events and its rendered output
back to the web process through Redis, and stops a run whose request was canceled."""

from __future__ import annotations

import logging
import threading
import time
from functools import partial

import redis

from service.distributed import wire
from service.distributed.ledger import Ledger
from service.errors import GenerationCanceled, InvalidField, ServiceError
from service.fields import generate_fields_model, parse_fields
from service.interface import Generated, RenderedOutput, ServiceState, process_name
from service.jobs.manager import CANCELED_QUEUED, PREVIEW_INTERVAL_S, PREVIEW_SIZE
from service.rendering import format_loras, render_output
from service.settings import Settings
from service.worker import GenerationWorker
from stable_diffusion.image_processing import DecodedImage, thumbnail
from stable_diffusion.recipe import GenerationEvent, GenerationRequest, GenerationResult, Started

log = logging.getLogger(__name__)
HEARTBEAT_S = 3
# A task's fields that the web tier's limits bound (the LoRAs too, checked apart).
CHECKED_FIELDS = (
    "prompt", "negative_prompt", "sensitivity", "seed", "steps", "guidance_scale", "control_start", "control_end",
    "refine_strength", "scheduler", "progress_gif",
)


class GpuRunner:
    def __init__(self, worker: GenerationWorker, ledger: Ledger, settings: Settings) -> None:
        self.worker, self.ledger, self.device = worker, ledger, settings.device
        self._settings = settings
        # The limits the web tier applies: a task read from Redis is checked against them again.
        self._fields = generate_fields_model(settings)
        self.name = process_name()
        self._stopped = threading.Event()
        # Requests this process runs; the heartbeat renews their claims.
        self._running: set[str] = set()
        self._images = 0
        worker.observe(self._generated)
        self._heart = threading.Thread(target=self._beat, name="gpu-heartbeat", daemon=True)
        self._heart.start()

    def run(self, message: object) -> None:
        """One Celery task: returns once the web process has its reply."""
        try:
            request, upload, owner, stem, events = wire.read_request(message, self._settings.max_gif_frames)
            self._check(request)
        except (wire.UntrustedMessage, InvalidField) as refusal:
            self._refuse(message, refusal)
            return
        request_id = request.request_id
        if self.ledger.canceled(request_id):
            log.info("request %s: canceled before it ran", request_id)
            self.ledger.reply(request_id, wire.failed(GenerationCanceled(CANCELED_QUEUED)))
            return
        if not self._claim(request_id):
            return
        self.ledger.left_queue(request_id)
        on_event = partial(self._relay, request_id, events, _Throttle())
        finish = partial(self._render, request, upload, stem)
        try:
            future = self.worker.submit(request, on_event, owner=owner, finish=finish)
            output, images = future.result()
            reply = wire.done(output, images)
        except ServiceError as error:
            reply = wire.failed(error)
        finally:
            self._running.discard(request_id)
        log.info("request %s: %s", request_id, reply["kind"])
        self.ledger.reply(request_id, reply)
        self.ledger.finish(request_id)
        self.ledger.release(owner, request_id)

    def _check(self, request: GenerationRequest) -> None:
        """InvalidField unless the request is one the web tier's fields allow: a GPU worker runs nothing a
        caller could not have asked for (steps, sizes, LoRAs...), whoever wrote the task into Redis."""
        values = {name: getattr(request, name) for name in CHECKED_FIELDS}
        parse_fields(self._fields, values | {"loras": format_loras(request.loras)})
        largest, sizes = self._settings.max_resolution, {image.size for image in request.control_images}
        if len(sizes) != 1 or any(side % 8 or not 8 <= side <= largest for side in next(iter(sizes))):
            raise InvalidField(f"edge maps must share one size, each side a multiple of 8 up to {largest}")

    def _refuse(self, message: object, refusal: Exception) -> None:
        """Logged; the request's follower, if any, hears why (a web host and a GPU host set up with different
        limits land here too)."""
        reason = refusal.message if isinstance(refusal, InvalidField) else str(refusal)
        request = message.get("request") if isinstance(message, dict) else None
        request_id = request.get("request_id") if isinstance(request, dict) else None
        log.warning("refused a task (request %.64r): %s", request_id, reason)
        if isinstance(request_id, str) and 0 < len(request_id) <= 200:
            self.ledger.reply(request_id, wire.failed(InvalidField(f"The GPU worker refused the request: {reason}")))
            self.ledger.finish(request_id)

    def _claim(self, request_id: str) -> bool:
        """Redis hands a task out again when it ran longer than TASK_VISIBILITY_TIMEOUT_S, or its worker
        died. Run it only when no live worker holds it: wait while one does; drop it once it finished."""
        while not self.ledger.claim(request_id, self.name):
            if self.ledger.finished(request_id):
                log.info("request %s: already finished by another worker", request_id)
                return False
            time.sleep(1)
        self._running.add(request_id)
        return True

    def stop(self, timeout: float | None = None) -> None:
        self._stopped.set()
        self.worker.close(timeout)

    def _relay(self, request_id: str, events: bool, throttle: _Throttle, event: GenerationEvent) -> None:
        """On the GPU thread, at every step: stop a canceled request; tell a watching web process."""
        if self.ledger.canceled(request_id):
            raise GenerationCanceled("Canceled while running.")
        if not events:
            return
        if isinstance(event, Started):
            self.ledger.reply(request_id, wire.started(event.total))
            return
        preview = thumbnail(event.preview(), PREVIEW_SIZE) if throttle.due() else None
        self.ledger.reply(request_id, wire.stepped(event.step, event.total, preview))

    def _render(
        self, request: GenerationRequest, upload: DecodedImage, stem: str, result: GenerationResult
    ) -> tuple[RenderedOutput, int]:
        generator = self.worker.generator
        rendered = render_output(request, result, upload, generator.model_name, generator.model_hash)
        file_name = f"{stem}.{rendered.extension}"
        output = RenderedOutput(rendered.data, rendered.mimetype, file_name, result.seconds, self.name)
        return output, len(result.images)

    def _generated(self, generated: Generated) -> None:
        self._images += generated.images
        self.ledger.record_seconds(generated.seconds)

    def _beat(self) -> None:
        while not self._stopped.is_set():
            state = self.worker.state
            about = {}
            if state == ServiceState.READY:
                about = self.worker.generator.describe()
            try:
                self.ledger.beat(self.name, {
                    "name": self.name, "state": state, "device": self.device, "about": about,
                    "running": len(self._running), "images": self._images,
                })
                self.ledger.renew(list(self._running))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("the heartbeat could not reach Redis (%s); retrying", exc)
            self._stopped.wait(HEARTBEAT_S)


class _Throttle:
    """True at most once per PREVIEW_INTERVAL_S."""

    def __init__(self) -> None:
        self._last = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < PREVIEW_INTERVAL_S:
            return False
        self._last = now
        return True
