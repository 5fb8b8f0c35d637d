"""Job records: what every job store keeps (the JobStore protocol), and the store of one process, a SQLite
file. Only records: running jobs is manager.py's, recording their life recording.py's."""

from __future__ import annotations

import enum
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from service.errors import StorageFull

log = logging.getLogger(__name__)


# The one list of job statuses: the store, the manager and the OpenAPI document use it; the client and the
# page, which cannot import it, are pinned to it by tests/test_job_statuses.py. Its docstring is the document's.
class JobStatus(enum.StrEnum):
    """queued -> running -> succeeded or failed; a job is canceled from queued or running."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
INTERRUPTED = "The server stopped before this job finished; submit it again."

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL,
    total INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    error TEXT,
    input_file TEXT,
    result_file TEXT,
    result_type TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
)
"""


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    status: JobStatus
    step: int
    total: int
    seed: int
    error: str | None = None
    input_file: str | None = None
    result_file: str | None = None
    result_type: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        # Records read back from SQLite carry plain strings; an unknown one fails here, not in an answer.
        object.__setattr__(self, "status", JobStatus(self.status))

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class JobStore(Protocol):
    """Where jobs are recorded. `shared`: other processes, on other hosts too, read and write the same records
    (QUEUE_BACKEND=celery: GPU workers record their jobs' progress and outcome there themselves). A finished
    job's record is final: a late update (progress after a cancel) changes nothing."""

    shared: bool

    def add(self, job: Job) -> None: ...

    def get(self, job_id: str) -> Job | None: ...

    def update(self, job_id: str, **changes: object) -> None: ...

    def delete(self, job_id: str) -> None: ...

    def finished_before(self, moment: float) -> list[Job]: ...

    def count_by_status(self) -> dict[str, int]: ...

    def put_preview(self, job_id: str, png: bytes) -> None: ...

    def get_preview(self, job_id: str) -> bytes | None: ...

    def close(self) -> None: ...


class SharedJobStore(JobStore, Protocol):
    """A store that every process of the service reads (`shared` is True): results are kept there too, since
    the process that answers a job may run on another host than the one that ran it."""

    def put_result(self, job_id: str, data: bytes) -> None: ...

    def get_result(self, job_id: str) -> bytes | None: ...


class SqliteJobStore:
    """The job records of one process, a SQLite file; previews in memory. Safe to call from any thread."""

    shared = False

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._columns = [field.name for field in fields(Job)]
        # The latest preview of each running job (dropped once it finishes): one process serves them all.
        self._previews: dict[str, bytes] = {}
        if interrupted := self._fail_unfinished():
            log.warning("%d job(s) left unfinished by the previous run were marked failed", interrupted)

    def add(self, job: Job) -> None:
        """StorageFull when the disk has no room for the record (the job is then not taken)."""
        values = [getattr(job, name) for name in self._columns]
        with self._lock:
            try:
                self._db.execute(
                    f"INSERT INTO jobs ({', '.join(self._columns)}) VALUES ({', '.join('?' * len(values))})", values
                )
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                raise StorageFull(
                    "The server's disk is full, so the job could not be recorded (JOBS_DB); retry later."
                ) from None

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(self._columns)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def update(self, job_id: str, **changes: object) -> None:
        assignments = ", ".join(f"{name} = ?" for name in changes)
        with self._lock:
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN (?, ?)",
                [*changes.values(), job_id, JobStatus.QUEUED, JobStatus.RUNNING],
            )
            if changes.get("status") in FINISHED:
                self._previews.pop(job_id, None)

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def finished_before(self, moment: float) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(self._columns)} FROM jobs WHERE finished_at < ?", (moment,)
            ).fetchall()
        return [Job(*row) for row in rows]

    def _fail_unfinished(self) -> int:
        """Jobs a previous process left queued or running can never finish (this process ran them alone)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE status IN (?, ?)",
                (JobStatus.FAILED, INTERRUPTED, time.time(), JobStatus.QUEUED, JobStatus.RUNNING),
            )
        return cursor.rowcount

    def count_by_status(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status.value: 0 for status in JobStatus} | dict(rows)

    def put_preview(self, job_id: str, png: bytes) -> None:
        self._previews[job_id] = png

    def get_preview(self, job_id: str) -> bytes | None:
        return self._previews.get(job_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()
