"""Job records in Redis, for QUEUE_BACKEND=celery: web processes on every machine add and read the records,
GPU workers record their jobs' progress, previews and outcome in them, and keep each job's result there too
(for JOB_RETENTION_S), so that any web process can serve it."""

from __future__ import annotations

import json
import logging
from dataclasses import fields

import redis
from pydantic import TypeAdapter, ValidationError

from service.errors import StorageFull
from service.jobs.store import FINISHED, Job, JobStatus
from service.redis_connection import PREFIX, reachable
from stable_diffusion.errors import first_line

log = logging.getLogger(__name__)

FINISHED_INDEX = PREFIX + "jobs:finished"
# Queued and running jobs by creation time, and finished ones by status: /metrics and the retention janitor
# read these indexes, never a scan over every job kept (millions, at a cluster's rate and a week's retention).
UNFINISHED_INDEX = PREFIX + "jobs:unfinished"
# A running job's latest preview, for watchers on other web processes.
PREVIEW_TTL_S = 120

# KEYS: the job, the unfinished index, the finished index, the finished status's index. ARGV: the job id, the
# moment it finished ('' while unfinished), then field and value pairs. A finished job's record is final.
_UPDATE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= '"queued"' and status ~= '"running"' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if ARGV[2] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
end
return 1
"""


_RECORD = TypeAdapter(Job)


def _key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def _result_key(job_id: str) -> str:
    return f"{PREFIX}job-result:{job_id}"


def _preview_key(job_id: str) -> str:
    return f"{PREFIX}job-preview:{job_id}"


def _status_index(status: JobStatus) -> str:
    return f"{PREFIX}jobs:{status}"


class RedisJobStore:
    """The JobStore interface on Redis: one hash per job (each field JSON), indexes of unfinished jobs and of
    finished ones (by time, and by status)."""

    shared = True

    def __init__(self, client: redis.Redis, retention_s: float) -> None:
        self.redis, self.retention_s = client, retention_s
        self._columns = [field.name for field in fields(Job)]
        self._update = client.register_script(_UPDATE)

    def add(self, job: Job) -> None:
        with reachable(), _room():
            pipe = self.redis.pipeline()
            pipe.hset(_key(job.id), mapping={name: json.dumps(getattr(job, name)) for name in self._columns})
            if job.finished:
                self._index_finished(pipe, job.id, job.status, job.finished_at or job.created_at)
            else:
                pipe.zadd(UNFINISHED_INDEX, {job.id: job.created_at})
            pipe.execute()

    def get(self, job_id: str) -> Job | None:
        with reachable():
            values = self.redis.hgetall(_key(job_id))
        return _job(values) if values else None

    def update(self, job_id: str, **changes: object) -> None:
        finished_at = changes.get("finished_at")
        status_index = _status_index(JobStatus(changes["status"])) if finished_at is not None else UNFINISHED_INDEX
        pairs = [item for name, value in changes.items() for item in (name, json.dumps(value))]
        with reachable(), _room():
            self._update(
                keys=[_key(job_id), UNFINISHED_INDEX, FINISHED_INDEX, status_index],
                args=[job_id, "" if finished_at is None else finished_at, *pairs],
            )

    @staticmethod
    def _index_finished(pipe: redis.client.Pipeline, job_id: str, status: JobStatus, moment: float) -> None:
        pipe.zrem(UNFINISHED_INDEX, job_id)
        pipe.zadd(FINISHED_INDEX, {job_id: moment})
        pipe.zadd(_status_index(status), {job_id: moment})

    def delete(self, job_id: str) -> None:
        with reachable():
            pipe = self.redis.pipeline()
            pipe.delete(_key(job_id), _result_key(job_id))
            for index in (UNFINISHED_INDEX, FINISHED_INDEX, *map(_status_index, FINISHED)):
                pipe.zrem(index, job_id)
            pipe.execute()

    def finished_before(self, moment: float) -> list[Job]:
        with reachable():
            ids = [job_id.decode() for job_id in self.redis.zrangebyscore(FINISHED_INDEX, "-inf", moment)]
        return [job for job in map(self.get, ids) if job is not None]

    def _unfinished(self) -> list[Job]:
        """The jobs of the unfinished index, read in one round trip; entries whose record is gone leave it."""
        with reachable():
            ids = self.redis.zrange(UNFINISHED_INDEX, 0, -1)
            pipe = self.redis.pipeline()
            for job_id in ids:
                pipe.hgetall(_key(job_id.decode()))
            records = pipe.execute()
            if gone := [job_id for job_id, values in zip(ids, records, strict=True) if not values]:
                self.redis.zrem(UNFINISHED_INDEX, *gone)
        jobs = [_job(values) for values in records if values]
        return [job for job in jobs if job is not None and not job.finished]

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(JobStatus, 0)
        with reachable():
            finished, pipe = sorted(FINISHED), self.redis.pipeline()
            for status in finished:
                pipe.zcard(_status_index(status))
            counts.update(zip(finished, pipe.execute(), strict=True))
        for job in self._unfinished():
            counts[job.status] += 1
        return counts

    def put_result(self, job_id: str, data: bytes) -> None:
        with reachable(), _room():
            self.redis.set(_result_key(job_id), data, ex=int(self.retention_s) + 3600)

    def get_result(self, job_id: str) -> bytes | None:
        with reachable():
            return self.redis.get(_result_key(job_id))

    def put_preview(self, job_id: str, png: bytes) -> None:
        with reachable():
            self.redis.set(_preview_key(job_id), png, ex=PREVIEW_TTL_S)

    def get_preview(self, job_id: str) -> bytes | None:
        with reachable():
            return self.redis.get(_preview_key(job_id))

    def close(self) -> None:
        self.redis.close()


def _job(values: dict[bytes, bytes]) -> Job | None:
    """A record as Job, checked field by field (any GPU host can write Redis); None for one this service
    cannot have written, logged."""
    try:
        return _RECORD.validate_python({name.decode(): json.loads(value) for name, value in values.items()})
    except (ValidationError, ValueError) as exc:
        log.warning("a job record in Redis that this service cannot have written is ignored: %s", first_line(exc))
        return None


class _room:
    """Redis at its memory limit refuses writes: the same 507 a full disk gives."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, redis.ResponseError) and str(error).startswith("OOM"):
            raise StorageFull("The job store (Redis) is out of memory, so the job could not be recorded; retry later.")
        return False
