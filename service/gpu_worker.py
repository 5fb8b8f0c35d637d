"""A GPU worker for QUEUE_BACKEND=celery: `python -m stable_diffusion.gpu_worker` runs this module's main()
(so does `python -m service.gpu_worker`; or, for operators who start Celery
themselves, `celery -A service.gpu_worker worker --pool threads --concurrency $BATCH_SIZE`). It loads the
model once, in this process, and runs generation tasks from the queue. One process per GPU: set DEVICE=cuda:1
or CUDA_VISIBLE_DEVICES for the second."""

from __future__ import annotations

import logging
import os
import sys
from functools import partial

from celery import signals

from service.distributed.celery_app import GENERATE_TASK, MENDED_TRANSPORT, QUEUE, QUICK_CONSUMER, make_celery
from service.distributed.gpu_side import GpuRunner
from service.distributed.ledger import Ledger
from service.jobs.redis_store import RedisJobStore
from service.local import load_runner
from service.redis_connection import connect
from service.settings import Settings, SettingsError
from service.worker import GenerationWorker

log = logging.getLogger(__name__)
GPU_REDIS_TIMEOUT_S = 10


def _settings() -> Settings:
    # A GPU worker answers no HTTP request, so it needs no API key.
    overrides = {} if os.environ.get("API_KEY") else {"api_keys": ("not-used-by-gpu-workers",)}
    try:
        return Settings.load(**overrides)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


settings = _settings()
app = make_celery(settings)
_runner: GpuRunner | None = None


@app.task(name=GENERATE_TASK)
def generate(message: dict) -> None:
    if _runner is None:
        raise RuntimeError("this process is not a GPU worker (the model loads when `celery worker` starts)")
    _runner.run(message)


@signals.celeryd_init.connect
def _worker_settings(conf=None, **_) -> None:
    """Settings for the worker alone: it consumes through the mended Redis transport, and reconnects quickly."""
    conf.broker_transport = MENDED_TRANSPORT
    conf.worker_consumer = QUICK_CONSUMER


@signals.worker_init.connect
def _load_model(sender=None, **_) -> None:
    """The model loads on the GenerationWorker's own thread; tasks that arrive meanwhile wait for it."""
    global _runner
    worker = GenerationWorker(
        partial(load_runner, settings),
        queue_size=settings.batch_size,
        on_load_failed=_stop,
        max_batch=settings.batch_size,
        batch_wait_s=settings.batch_wait_ms / 1000,
    )
    horizon = max(settings.generation_timeout_s, settings.task_visibility_timeout_s) * 2
    # Longer than a web process's timeout: an outcome may carry a large result.
    redis_client = connect(settings.redis_url, timeout_s=GPU_REDIS_TIMEOUT_S)
    ledger = Ledger(redis_client, settings.queue_size, settings.max_queued_per_key, horizon)
    # Named as Celery (and Flower) name this worker: celery@gpu-<host>-<pid>.
    node = getattr(sender, "hostname", "") or ""
    _runner = GpuRunner(worker, ledger, RedisJobStore(redis_client, settings.job_retention_s), settings, node)


@signals.worker_shutdown.connect
def _finish(**_) -> None:
    """Celery's warm shutdown (SIGTERM) waits for the running tasks; then the model's thread stops."""
    if _runner is not None:
        _runner.stop(timeout=settings.shutdown_grace_s)


def _stop(error: Exception) -> None:
    """The model cannot load: one line per setting at fault, as the web server says it."""
    for line in str(error).splitlines():
        print(f"error: {line}", file=sys.stderr, flush=True)
    os._exit(4)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.worker_main([
        "worker",
        "--pool=threads",
        # As many tasks at once as one batch holds: they meet in the GenerationWorker and share a run.
        f"--concurrency={settings.batch_size}",
        f"--queues={QUEUE}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        "--hostname=gpu-%h-" + str(os.getpid()),
    ])


if __name__ == "__main__":
    main()
