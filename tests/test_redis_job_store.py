"""The job stores: the Redis one (QUEUE_BACKEND=celery) against a real redis-server, where what /metrics and
the retention janitor read comes from its indexes, never from a scan over every job kept, and a record this
service cannot have written is ignored; both stores keep a finished job's record final. And the ledger's
running average, read back from Redis."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from service.distributed.ledger import AVERAGE_SECONDS, Ledger
from service.errors import QueueUnreachable, TooManyRequests
from service.jobs.manager import JobManager
from service.jobs.redis_store import RedisJobStore
from service.jobs.store import Job, JobStatus, SqliteJobStore
from service.redis_connection import OPEN_S, UNREACHABLE, connect
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

    assert store.count_by_status() == {
        JobStatus.QUEUED: 1, JobStatus.RUNNING: 1, JobStatus.SUCCEEDED: 1, JobStatus.CANCELED: 1, JobStatus.FAILED: 0,
    }
    assert [job.id for job in store.finished_before(time.time() + 1)] == ["c", "d"]
    assert scans(store) == before, "/metrics and the janitor must not scan every job"


def test_a_job_whose_record_is_gone_leaves_the_unfinished_index(store):
    store.add(job("kept"))
    store.add(job("lost"))
    store.redis.delete("sd:job:lost")  # evicted by Redis under memory pressure, say
    assert store.count_by_status()[JobStatus.QUEUED] == 1
    assert store.redis.zrange("sd:jobs:unfinished", 0, -1) == [b"kept"]


def test_a_record_this_service_cannot_have_written_is_ignored(store, caplog):
    store.add(job("crafted"))
    store.redis.hset("sd:job:crafted", "status", '"done-by-me"')
    assert store.get("crafted") is None and store.count_by_status()[JobStatus.QUEUED] == 0
    assert "cannot have written" in caplog.text


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_finished_jobs_record_is_final(kind, store, tmp_path):
    """A GPU worker's late progress, or a cancel that crosses the job's end, never changes how it ended."""
    jobs = store if kind == "redis" else SqliteJobStore(tmp_path / "jobs.db")
    jobs.add(job("done"))
    jobs.update("done", status=JobStatus.SUCCEEDED, result_file="x.png", step=4, finished_at=time.time())
    jobs.update("done", status=JobStatus.RUNNING, step=1)
    jobs.update("done", status=JobStatus.CANCELED, error="late", finished_at=time.time())
    finished = jobs.get("done")
    assert (finished.status, finished.step, finished.error, finished.result_file) == (
        JobStatus.SUCCEEDED, 4, None, "x.png"
    )
    assert jobs.count_by_status()[JobStatus.CANCELED] == 0


class _RedisLostWhileQueueing:
    """The edge of the test: a generation service that loses Redis as it queues a job (the real redis-server
    stops) and refuses it, as the Celery service does."""

    def __init__(self, broker: RedisServer) -> None:
        self.broker = broker

    def submit_job(self, *_) -> None:
        self.broker.stop()
        raise QueueUnreachable(UNREACHABLE, retry_after=5)


def test_a_job_refused_as_redis_goes_away_leaves_no_queued_record_once_it_is_back(tmp_path):
    broker = RedisServer(tmp_path)
    store = RedisJobStore(connect(broker.url), retention_s=3600)
    manager = JobManager(store, _RedisLostWhileQueueing(broker), tmp_path, tmp_path, retention_s=3600)
    try:
        fields = SimpleNamespace(seed=1)
        with pytest.raises(QueueUnreachable):
            manager.submit("key", "lost", fields, b"")
        broker.restart()
        time.sleep(OPEN_S)
        assert store.get("lost").status == JobStatus.QUEUED  # the record outlived the restart (append-only file)
        manager.remove_expired()  # what the janitor runs every few seconds
        assert store.get("lost") is None
    finally:
        manager.close()
        broker.stop()


@pytest.mark.parametrize("planted", [b"inf", b"nan", b"-5", b"1e400", b"plenty"])
def test_a_planted_average_generation_time_still_gives_a_429_that_says_how_long(tmp_path, planted):
    """The ledger's running average lives in Redis, where any GPU host can write: a value no worker could have
    recorded counts as the first guess (an infinite one made every refusal a 500)."""
    broker = RedisServer(tmp_path)
    try:
        ledger = Ledger(connect(broker.url), queue_size=4, max_per_owner=1, horizon_s=60)
        broker.client().set(AVERAGE_SECONDS, planted)
        ledger.reserve("key", "first")
        with pytest.raises(TooManyRequests) as refused:
            ledger.reserve("key", "second")
        assert refused.value.retry_after == 1 and "about 1 s" in refused.value.message
    finally:
        broker.stop()
