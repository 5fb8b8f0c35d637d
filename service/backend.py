"""The one place that chooses the backend from QUEUE_BACKEND: the generation service, the job store, where
the rate limiter counts, and whether that state is shared by other processes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.interface import GenerationService
from service.jobs.store import JobStore, SqliteJobStore
from service.local import LocalGenerationService
from service.settings import Settings


@dataclass(frozen=True)
class Backend:
    service: GenerationService
    jobs: JobStore
    # flask-limiter's storage: this process's memory, or the shared Redis.
    limiter_storage_uri: str

    @property
    def shared(self) -> bool:
        """Other processes (other hosts too) share the queue, the jobs and the counts."""
        return self.jobs.shared


def build_backend(
    settings: Settings,
    service: GenerationService | None = None,
    on_load_failed: Callable[[Exception], None] | None = None,
) -> Backend:
    """local: the model loads in this process, in the background; jobs in SQLite. celery: GPU workers
    elsewhere, jobs and counts in Redis. `service`: one already built (tests)."""
    if settings.queue_backend == "celery":
        from service.distributed.web_side import CeleryGenerationService
        from service.jobs.redis_store import RedisJobStore
        from service.redis_connection import connect

        return Backend(
            service or CeleryGenerationService(settings),
            RedisJobStore(connect(settings.redis_url), settings.job_retention_s),
            settings.redis_url,
        )
    return Backend(
        service or LocalGenerationService.start(settings, on_load_failed=on_load_failed),
        SqliteJobStore(settings.jobs_db),
        "memory://",
    )
