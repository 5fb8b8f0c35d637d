"""Asynchronous jobs: records and their statuses (store.py), their runs on the generation service
(manager.py), and how callers see them (view.py)."""

from service.jobs.manager import JobEvent, JobManager
from service.jobs.store import FINISHED, Job, JobStatus, JobStore
from service.jobs.view import JobProgress, JobView, describe

__all__ = [
    "FINISHED", "Job", "JobEvent", "JobManager", "JobProgress", "JobStatus", "JobStore", "JobView", "describe",
]
