"""Endpoints for operators and clients: liveness, readiness, what the server runs (/info), Prometheus metrics."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from service.interface import Generated, ServiceState
from service.jobs import JobStore
from web.access import public

operations = Blueprint("operations", __name__)


@operations.get("/health")
@public
def health():
    """Alive; says nothing about the model (that is /ready)."""
    return jsonify(status="ok")


@operations.get("/ready")
def ready():
    service = current_app.extensions["service"]
    body = {"status": service.state, "queue_depth": service.queue_depth, "queue_size": service.queue_size}
    workers = service.gpu_workers()
    if workers is not None:
        body["gpu_workers"] = sum(worker["state"] == ServiceState.READY for worker in workers)
    if service.state != ServiceState.READY:
        response = jsonify(body | {"error": service.state.not_ready_message})
        response.headers["Retry-After"] = "5"
        return response, 503
    return jsonify(body)


@operations.get("/info")
def info():
    settings = current_app.extensions["settings"]
    return jsonify(
        current_app.extensions["service"].describe()
        | {
            "fields": {
                "generate": current_app.extensions["generate_fields"].model_json_schema()["properties"],
                "preprocess": current_app.extensions["edge_fields"].model_json_schema()["properties"],
            },
            "limits": {
                "max_upload_mb": settings.max_upload_mb,
                "max_image_pixels": settings.max_image_pixels,
                "max_gif_frames": settings.max_gif_frames,
                "max_prompt_chars": settings.max_prompt_chars,
                "queue_size": settings.queue_size,
                "generation_timeout_s": settings.generation_timeout_s,
            },
        }
    )


@operations.get("/metrics")
def metrics():
    registry = current_app.extensions["metrics"].registry
    # content_type, not mimetype: CONTENT_TYPE_LATEST already names its charset, and mimetype would add another.
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


class Metrics:
    """The app's Prometheus metrics, in a registry of its own so that every app counts for itself."""

    def __init__(self, app: Flask, jobs: JobStore) -> None:
        service = app.extensions["service"]
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
        running = GaugeMetricFamily("gpu_worker_running", "Requests a GPU worker runs now", labels=["worker"])
        images = CounterMetricFamily("gpu_worker_images", "Images a GPU worker generated", labels=["worker"])
        workers = self.service.gpu_workers() or []
        for state in ServiceState:
            states.add_metric([state], sum(worker["state"] == state for worker in workers))
        for worker in workers:
            running.add_metric([worker["name"]], worker.get("running", 0))
            images.add_metric([worker["name"]], worker.get("images", 0))
        yield from (states, running, images)
