"""Endpoints for operators and clients: liveness, readiness, what the server runs (/info), Prometheus metrics;
their JSON bodies are the models below, which the OpenAPI document is generated from."""

from __future__ import annotations

from typing import Any, Literal

from flask import Blueprint, Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from service.errors import ModelNotReady
from service.interface import Description, Generated, ModelEntry, ServiceState
from service.jobs import JobStore
from web.access import public
from web.parts import get_edge_fields, get_generate_fields, get_loras, get_metrics, get_service, get_settings

operations = Blueprint("operations", __name__)


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"]


class Ready(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: ServiceState
    queue_depth: int = Field(ge=0, description="requests waiting to run")
    queue_size: int = Field(ge=1, description="the most that may wait (QUEUE_SIZE)")
    gpu_workers: int | None = Field(
        None, ge=0, description="QUEUE_BACKEND=celery only: GPU workers ready (absent in local mode)"
    )


class NotReady(Ready):
    error: str = Field(description="why the service cannot generate now")


class FieldSchemas(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generate: dict[str, Any] = Field(description="each /generate field's JSON Schema, by name")
    preprocess: dict[str, Any] = Field(description="each /preprocess field's JSON Schema, by name")


class Limits(BaseModel):
    """The settings that bound a request, named as in the environment but in lower case."""

    model_config = ConfigDict(extra="forbid")

    max_upload_mb: float
    max_image_pixels: int
    max_gif_frames: int
    max_prompt_chars: int
    queue_size: int
    generation_timeout_s: float


class Info(Description):
    """What the server runs (the backend says: model, device and more), the fields and the limits."""

    fields: FieldSchemas
    limits: Limits


class LoraEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="what the loras field and <lora:name:weight> take: the file's name in LORA_DIR")
    size_bytes: int
    sha256: str | None = Field(description="the SHA-256 of the whole file; null until the server has read it")
    short_hash: str | None = Field(
        description="AUTOMATIC1111's Lora hash: 12 digits of the SHA-256 of the tensors; null until known"
    )


class Models(BaseModel):
    """What a request runs on: the base model and the ControlNet (null while the model loads), and the LoRAs
    it may name."""

    model_config = ConfigDict(extra="forbid")

    sd_model: ModelEntry | None
    controlnet_model: ModelEntry | None
    loras: list[LoraEntry]


@operations.get("/health")
@public
def health():
    """Alive; says nothing about the model (that is /ready)."""
    return jsonify(Health(status="ok").model_dump())


@operations.get("/ready")
def ready():
    service = get_service()
    state = service.state
    queue = {"queue_depth": service.queue_depth, "queue_size": service.queue_size}
    workers = service.gpu_workers()
    if workers is not None:
        queue["gpu_workers"] = sum(worker["state"] == ServiceState.READY for worker in workers)
    if state != ServiceState.READY:
        body = NotReady(status=state, error=state.not_ready_message, **queue)
        response = jsonify(body.model_dump(mode="json", exclude_none=True))
        response.headers["Retry-After"] = "5"
        return response, 503
    return jsonify(Ready(status=state, **queue).model_dump(mode="json", exclude_none=True))


@operations.get("/info")
def info():
    schemas = FieldSchemas(
        generate=get_generate_fields().model_json_schema()["properties"],
        preprocess=get_edge_fields().model_json_schema()["properties"],
    )
    limits = Limits.model_validate(get_settings(), from_attributes=True)
    # Unset (not null): gpu_workers in local mode.
    info = Info(**get_service().describe().model_dump(exclude_unset=True), fields=schemas, limits=limits)
    return jsonify(info.model_dump(mode="json", exclude_unset=True))


@operations.get("/models")
def models():
    try:
        about = get_service().describe()
    except ModelNotReady:
        about = None
    loras = [
        LoraEntry(name=lora.name, size_bytes=lora.size, sha256=lora.sha256, short_hash=lora.short_hash)
        for lora in get_loras().describe(about and about.family)
    ]
    files = about.model_files if about else None
    models = Models(sd_model=files and files.sd_model, controlnet_model=files and files.controlnet_model, loras=loras)
    return jsonify(models.model_dump(mode="json"))


@operations.get("/metrics")
def metrics():
    registry = get_metrics().registry
    # content_type, not mimetype: CONTENT_TYPE_LATEST already names its charset, and mimetype would add another.
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


class Metrics:
    """The app's Prometheus metrics, in a registry of its own so that every app counts for itself."""

    def __init__(self, app: Flask, jobs: JobStore) -> None:
        service = get_service(app)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"],
            registry=self.registry,
        )
        Gauge("queue_depth", "Generation requests waiting for the worker", registry=self.registry).set_function(
            lambda: service.queue_depth
        )
        self.generation_seconds = Histogram(
            "generation_seconds", "Time the pipeline took per request",
            buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600), registry=self.registry,
        )
        self.images = Counter("images_generated", "Images (GIF frames included) generated", registry=self.registry)
        self.registry.register(_JobsCollector(jobs))
        if service.gpu_workers() is not None:
            self.registry.register(_GpuWorkersCollector(service))
        service.observe(self._generated)

        @app.after_request
        def count_request(response):
            self.requests.labels(request.endpoint or "unknown", str(response.status_code)).inc()
            return response

    def _generated(self, generated: Generated) -> None:
        self.generation_seconds.observe(generated.seconds)
        self.images.inc(generated.images)


class _JobsCollector:
    """Jobs by status, counted in the job store at scrape time."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    def collect(self):
        family = GaugeMetricFamily("jobs", "Jobs in the store, by status", labels=["status"])
        for status, count in self.jobs.count_by_status().items():
            family.add_metric([status], count)
        yield family


class _GpuWorkersCollector:
    """QUEUE_BACKEND=celery: each GPU worker's figures, as its last heartbeat gave them."""

    def __init__(self, service) -> None:
        self.service = service

    def collect(self):
        states = GaugeMetricFamily("gpu_workers", "GPU workers connected, by state", labels=["state"])
        # worker: host:pid, as X-Worker says; node and queue: Celery's names, as Flower shows them.
        labels = ["worker", "node", "queue"]
        running = GaugeMetricFamily("gpu_worker_running", "Requests a GPU worker runs now", labels=labels)
        images = CounterMetricFamily("gpu_worker_images", "Images a GPU worker generated", labels=labels)
        workers = self.service.gpu_workers() or []
        for state in ServiceState:
            states.add_metric([state], sum(worker["state"] == state for worker in workers))
        for worker in workers:
            names = [worker["name"], worker["node"], worker["queue"]]
            running.add_metric(names, worker["running"])
            images.add_metric(names, worker["images"])
        yield from (states, running, images)
