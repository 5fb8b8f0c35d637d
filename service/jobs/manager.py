"""Asynchronous jobs on top of the generation service: submitted like /generate, recorded in the job
store as they go, watched live (status, progress, previews), canceled, and removed after retention."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, cast

from pydantic import BaseModel

from service.errors import Conflict, Gone, NotFound, ServiceError
from service.fields import with_seed
from service.interface import GenerationService
from service.jobs.recording import JobRecorder
from service.jobs.store import Job, JobStatus, JobStore, SharedJobStore
from service.storage import UntrustedName, stored_file

log = logging.getLogger(__name__)
# What a result may be served as (a record in a shared store could say text/html).
RESULT_TYPES = ("image/png", "image/gif")
# How often a watcher looks at a shared store (QUEUE_BACKEND=celery: a GPU worker records the job's changes).
STORE_POLL_S = 0.5


@dataclass(frozen=True)
class JobEvent:
    """One thing a watcher is told: `kind` is status, progress or preview."""

    kind: str
    job: Job
    preview_png: bytes | None = None


class JobManager:
    """Submits jobs to the generation service, records their life in the store, and lets callers watch them."""

    def __init__(
        self, store: JobStore, service: GenerationService, input_dir: Path, output_dir: Path, retention_s: float
    ) -> None:
        self.store, self.service = store, service
        self.input_dir, self.output_dir, self.retention_s = input_dir, output_dir, retention_s
        self._changed = threading.Condition()
        self._version = 0
        # Records of jobs refused after they were written, that could not be deleted then (the janitor tries).
        self._refused: set[str] = set()
        self._closed = threading.Event()
        try:
            self.remove_expired()
        except ServiceError as error:  # a shared store out of reach (Redis down): the janitor tries again
            log.warning("expired jobs not removed at start-up: %s", error.message)
        self._janitor = threading.Thread(target=self._remove_expired_periodically, name="job-janitor", daemon=True)
        self._janitor.start()

    def submit(self, owner: str, job_id: str, fields: BaseModel, upload: bytes) -> Job:
        """Record the job, then submit it; refused (QueueFull, StorageFull, a bad upload...), it leaves no
        record and no file. The seed is drawn here, so that the record shows it from the start."""
        fields = with_seed(fields)
        job = Job(
            id=job_id, owner=owner, status=JobStatus.QUEUED, step=0, total=0, seed=fields.seed, created_at=time.time()
        )
        self.store.add(job)
        try:
            self.service.submit_job(fields, upload, owner, self._recorder(job_id))
        except ServiceError:
            self._forget(job_id)
            raise
        try:
            return self.store.get(job_id) or job
        except ServiceError:  # a shared store out of reach a moment after: the job is queued all the same
            return job

    def get(self, job_id: str, owner: str) -> Job:
        job = self.store.get(job_id)
        if job is None or job.owner != owner:
            # Another key's job answers exactly like a missing one.
            raise NotFound(f"No job {job_id!r}: it never existed, was removed after the retention period, "
                           "or belongs to another API key.")
        return job

    def queue_position(self, job_id: str) -> int | None:
        return self.service.position(job_id)

    def cancel(self, job_id: str, owner: str) -> Job:
        """A queued job is canceled at once; a running one stops at its next step."""
        job = self.get(job_id, owner)
        if job.finished:
            raise Conflict(f"Job {job_id} has already {job.status}; there is nothing to cancel.")
        if self.service.cancel(job_id, owner):
            # It left the queue and never runs. (A running one stops at its next step, and its run records that.)
            self._recorder(job_id).canceled()
        return self.store.get(job_id)

    def open_result(self, job_id: str, owner: str) -> tuple[BinaryIO, str, str]:
        """The result file, open for reading, with its MIME type and extension. Opened here, so a file
        removed under a job (by the retention janitor, or by hand) is a 410, not a failure to send it."""
        job = self.get(job_id, owner)
        if job.status != JobStatus.SUCCEEDED:
            raise Conflict(
                f"Job {job_id} is {job.status}; its result exists only once it has succeeded"
                + ("." if job.finished else ": watch GET /jobs/<id>/events or poll GET /jobs/<id>.")
            )
        try:
            path = stored_file(self.output_dir, job.result_file)
            if job.result_type not in RESULT_TYPES:
                raise UntrustedName(f"a result of type {str(job.result_type)[:40]!r}")
        except UntrustedName as exc:
            log.warning("job %s: its record names a result file the service cannot have made: %s", job_id, exc)
            raise Gone(f"The result of job {job_id} is no longer available.") from None
        try:
            return path.open("rb"), job.result_type, path.suffix
        except FileNotFoundError:
            # A GPU worker ran the job (QUEUE_BACKEND=celery): the shared store keeps its result.
            kept = cast(SharedJobStore, self.store).get_result(job_id) if self.store.shared else None
            if kept is not None:
                return io.BytesIO(kept), job.result_type, path.suffix
            raise Gone(
                f"Job {job_id}'s result file is gone (results are kept for {self.retention_s:g} s, "
                "JOB_RETENTION_S); submit the job again."
            ) from None

    def events(self, job_id: str, owner: str, heartbeat_s: float = 15.0) -> Iterator[JobEvent | None]:
        """Status, progress and preview changes as they happen, ending with the finished status;
        None after `heartbeat_s` without news, so a stream can keep its connection alive."""
        # The version is taken before each read, so a change landing between a read and the next wait
        # is never missed (a job finishing there would otherwise leave its stream open forever).
        with self._changed:
            seen = self._version
        job = self.get(job_id, owner)
        yield JobEvent("status", job)
        sent_preview: bytes | None = None
        quiet_since = time.monotonic()
        # With a shared store (QUEUE_BACKEND=celery) a GPU worker records the job's changes: look there often.
        # Alone, every change comes through this process and wakes the wait.
        wait_s = STORE_POLL_S if self.store.shared else heartbeat_s
        while not job.finished:
            with self._changed:
                self._changed.wait_for(partial(self._changed_since, seen), wait_s)
                news, seen = self._version != seen, self._version
            if self._closed.is_set():
                return
            try:
                latest = self.store.get(job_id) if news or self.store.shared else job
                preview = self.store.get_preview(job_id)
            except ServiceError:  # a shared store out of reach for a moment: the stream waits for it
                latest, preview = job, None
            if latest is None:
                return
            told = False
            if latest.status != job.status:
                told = True
                yield JobEvent("status", latest)
            elif latest.step != job.step:
                told = True
                yield JobEvent("progress", latest)
            if preview and preview != sent_preview and not latest.finished:
                sent_preview, told = preview, True
                yield JobEvent("preview", latest, sent_preview)
            if told:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= heartbeat_s:
                quiet_since = time.monotonic()
                yield None
            job = latest

    def _changed_since(self, seen: int) -> bool:
        return self._version != seen or self._closed.is_set()

    def _forget(self, job_id: str) -> None:
        """Delete the record of a job that was refused; a shared store that went away in between (Redis lost
        while the job was being queued) keeps it until the janitor can: never a job queued for ever."""
        try:
            self.store.delete(job_id)
        except ServiceError as error:
            log.warning("job %s: refused, and its record not deleted yet (%s)", job_id, error.message)
            self._refused.add(job_id)

    def remove_expired(self) -> int:
        """Delete jobs that finished longer than the retention period ago, the record first: a job is never
        listed without its files (a crash in between leaves only unlisted files); and the records of refused
        jobs that could not be deleted at the time."""
        for job_id in list(self._refused):
            self.store.delete(job_id)
            self._refused.discard(job_id)
        expired = self.store.finished_before(time.time() - self.retention_s)
        for job in expired:
            self.store.delete(job.id)
            for folder, name in ((self.input_dir, job.input_file), (self.output_dir, job.result_file)):
                if name:
                    self._remove(job.id, folder, name)
        return len(expired)

    @staticmethod
    def _remove(job_id: str, folder: Path, name: str) -> None:
        try:
            stored_file(folder, name).unlink(missing_ok=True)
        except UntrustedName as exc:  # a record in a shared store that this service cannot have written
            log.warning("job %s: not removing a file its record names: %s", job_id, exc)

    def close(self) -> None:
        self._closed.set()
        with self._changed:
            self._changed.notify_all()
        self._janitor.join(timeout=5)
        self.store.close()

    def _remove_expired_periodically(self) -> None:
        interval = min(60.0, max(self.retention_s / 4, 0.5))
        while not self._closed.wait(interval):
            try:
                self.remove_expired()
            except ServiceError as error:
                log.warning("removing expired jobs failed: %s", error.message)
            except Exception:
                log.exception("removing expired jobs failed")

    def _recorder(self, job_id: str) -> JobRecorder:
        return JobRecorder(self.store, job_id, on_change=self._changed_now)

    def _changed_now(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()
