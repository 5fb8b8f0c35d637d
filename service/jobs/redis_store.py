"""Job records in Redis, for QUEUE_BACKEND=celery: every web process on every machine reads and writes the
same records, and keeps each job's result there too (for JOB_RETENTION_S), so any of them can serve it."""

from __future__ import annotations

import json
from dataclasses import fields

import redis

from service.distributed.ledger import PREFIX, reachable
from service.jobs.store import Job, JobStatus
from stable_diffusion.errors import StorageFull

FINISHED_INDEX = PREFIX + "jobs:finished"
# A running job's latest preview, for watchers on other web processes.
PREVIEW_TTL_S = 120


def _key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def _result_key(job_id: str) -> str:
    return f"{PREFIX}job-result:{job_id}"


class RedisJobStore:
    """The JobStore interface on Redis: one hash per job (each field JSON), an index of finished jobs by time."""

    def __init__(self, client: redis.Redis, retention_s: float) -> None:
        self.redis, self.retention_s = client, retention_s
        self._columns = [field.name for field in fields(Job)]

    def add(self, job: Job) -> None:
        with reachable(), _room():
            self.redis.hset(_key(job.id), mapping={name: json.dumps(getattr(job, name)) for name in self._columns})

    def get(self, job_id: str) -> Job | None:
        with reachable():
            values = self.redis.hgetall(_key(job_id))
        if not values:
            return None
        return Job(**{name.decode(): json.loads(value) for name, value in values.items()})

    def update(self, job_id: str, **changes: object) -> None:
        with reachable(), _room():
            pipe = self.redis.pipeline()
            # Only a job that exists: a late update must not bring a removed job back as a fragment.
            if not self.redis.exists(_key(job_id)):
                return
            pipe.hset(_key(job_id), mapping={name: json.dumps(value) for name, value in changes.items()})
            if changes.get("finished_at") is not None:
                pipe.zadd(FINISHED_INDEX, {job_id: changes["finished_at"]})
            pipe.execute()

    def delete(self, job_id: str) -> None:
        with reachable():
            self.redis.delete(_key(job_id), _result_key(job_id))
            self.redis.zrem(FINISHED_INDEX, job_id)

    def finished_before(self, moment: float) -> list[Job]:
        with reachable():
            ids = [job_id.decode() for job_id in self.redis.zrangebyscore(FINISHED_INDEX, "-inf", moment)]
        return [job for job in map(self.get, ids) if job is not None]

    def fail_unfinished(self, message: str) -> int:
        """Never: other web processes may be following the unfinished jobs."""
        return 0

    def unfinished(self) -> list[Job]:
        with reachable():
            keys = list(self.redis.scan_iter(match=_key("*"), count=1000))
        jobs = [self.get(key.decode().removeprefix(_key(""))) for key in keys]
        return [job for job in jobs if job is not None and not job.finished]

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(JobStatus, 0)
        with reachable():
            keys = list(self.redis.scan_iter(match=_key("*"), count=1000))
            pipe = self.redis.pipeline()
            for key in keys:
                pipe.hget(key, "status")
            for status in pipe.execute():
                if status:
                    counts[JobStatus(json.loads(status))] += 1
        return counts

    def put_result(self, job_id: str, data: bytes) -> None:
        with reachable(), _room():
            self.redis.set(_result_key(job_id), data, ex=int(self.retention_s) + 3600)

    def get_result(self, job_id: str) -> bytes | None:
        with reachable():
            return self.redis.get(_result_key(job_id))

    def put_preview(self, job_id: str, png: bytes) -> None:
        with reachable():
            self.redis.set(f"{PREFIX}job-preview:{job_id}", png, ex=PREVIEW_TTL_S)

    def get_preview(self, job_id: str) -> bytes | None:
        with reachable():
            return self.redis.get(f"{PREFIX}job-preview:{job_id}")

    def close(self) -> None:
        self.redis.close()


class _room:
    """Redis at its memory limit refuses writes: the same 507 a full disk gives."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, redis.ResponseError) and str(error).startswith("OOM"):
            raise StorageFull("The job store (Redis) is out of memory, so the job could not be recorded; retry later.")
        return False
