"""The Redis job store (QUEUE_BACKEND=celery) against a real redis-server: what adoption and /metrics read
comes from its indexes, never from a scan over every job kept."""

from __future__ import annotations

import time

import pytest

from service.distributed.ledger import connect
from service.jobs.redis_store import RedisJobStore
from service.jobs.store import Job, JobStatus
from tests.processes import RedisServer


@pytest.fixture
def store(tmp_path):
    broker = RedisServer(tmp_path)
    store = RedisJobStore(connect(broker.url), retention_s=3600)
    try:
        yield store
    finally:
        store.close()
        broker.stop()


def job(job_id: str) -> Job:
    return Job(id=job_id, owner="key", status=JobStatus.QUEUED, step=0, total=4, seed=1, created_at=time.time())


def scans(store: RedisJobStore) -> int:
    return store.redis.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)


def test_unfinished_jobs_and_counts_follow_every_change_without_scanning(store):
    for job_id in ("a", "b", "c", "d", "e"):
        store.add(job(job_id))
    store.update("b", status=JobStatus.RUNNING, started_at=time.time())
    store.update("c", status=JobStatus.SUCCEEDED, finished_at=time.time())
    store.update("d", status=JobStatus.CANCELED, finished_at=time.time())
    store.update("e", status=JobStatus.FAILED, error="boom", finished_at=time.time())
    store.delete("e")
    before = scans(store)

    assert sorted(job.id for job in store.unfinished()) == ["a", "b"]
    assert store.count_by_status() == {
        JobStatus.QUEUED: 1, JobStatus.RUNNING: 1, JobStatus.SUCCEEDED: 1, JobStatus.CANCELED: 1, JobStatus.FAILED: 0,
    }
    assert [job.id for job in store.finished_before(time.time() + 1)] == ["c", "d"]
    assert scans(store) == before, "adoption and /metrics must not scan every job"


def test_a_job_whose_record_is_gone_leaves_the_unfinished_index(store):
    store.add(job("kept"))
    store.add(job("lost"))
    store.redis.delete("sd:job:lost")  # evicted by Redis under memory pressure, say
    assert [job.id for job in store.unfinished()] == ["kept"]
    assert store.count_by_status()[JobStatus.QUEUED] == 1
