"""The Celery application both sides share: web processes send generation tasks, GPU workers run them."""

from __future__ import annotations

from celery import Celery

from service.settings import Settings

GENERATE_TASK = "generation.generate"
QUEUE = "generation"


def make_celery(settings: Settings) -> Celery:
    app = Celery("stable_diffusion_api", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        # JSON only: a pickle from the broker would run code in the GPU worker.
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=QUEUE,
        # Acknowledged only once done, and given back when the worker process dies mid-way, so a task a
        # killed GPU worker held runs on another one (Redis hands it out again after the visibility timeout).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_transport_options={
            "visibility_timeout": settings.task_visibility_timeout_s,
            # Look for such tasks every few seconds (kombu's default sweep is about 100 s apart).
            "unacked_restore_interval": max(1, min(10, int(settings.task_visibility_timeout_s / 2))),
            "unacked_restore_throttle": 1,
        },
        # One batch's worth per worker (its concurrency is BATCH_SIZE): never a hoard an idle worker could take.
        worker_prefetch_multiplier=1,
        # A web process with Redis gone answers 503 at once instead of retrying the publish.
        task_publish_retry=False,
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app
