"""Asynchronous jobs: records and their statuses (store.py, redis_store.py), a job's life as it is recorded
(recording.py), their runs on the generation service (manager.py), and how callers see them (view.py)."""

from service.jobs.manager import JobEvent, JobManager
from service.jobs.recording import JobRecorder
from service.jobs.store import FINISHED, Job, JobStatus, JobStore, SqliteJobStore
from service.jobs.view import JobProgress, JobView, describe

__all__ = [
    "FINISHED", "Job", "JobEvent", "JobManager", "JobProgress", "JobRecorder", "JobStatus", "JobStore",
    "JobView", "SqliteJobStore", "describe",
]
