"""Asynchronous jobs: records (store.py) and their runs on the generation service (manager.py)."""

from service.jobs.manager import JobEvent, JobManager, describe
from service.jobs.store import FINISHED, STATUSES, Job, JobStore

__all__ = ["FINISHED", "STATUSES", "Job", "JobEvent", "JobManager", "JobStore", "describe"]
