"""Asynchronous jobs on top of the generation service: submitted like /generate, recorded in the job
store as they go, watched live (status, progress, previews), canceled, and removed after retention."""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel

from service.fields import MAX_SEED
from service.interface import GenerationService
from service.jobs.store import Job, JobStatus, JobStore
from service.storage import UntrustedName, stored_file
from stable_diffusion.errors import Conflict, GenerationCanceled, Gone, NotFound, ServiceError
from stable_diffusion.image_processing import encode_png, thumbnail
from stable_diffusion.recipe import GenerationEvent, Started

log = logging.getLogger(__name__)
# What a result may be served as (a record in a shared store could say text/html).
RESULT_TYPES = ("image/png", "image/gif")

INTERRUPTED = "The server stopped before this job finished; submit it again."
CANCELED_QUEUED = "Canceled before it started."
# Watchers get a preview picture at most this often, this many pixels on its longer side.
PREVIEW_INTERVAL_S = 1.0
PREVIEW_SIZE = 256
# How often a watcher looks at the store for a job that another process of the service follows.
STORE_POLL_S = 0.5
# How often a web process looks for jobs nobody follows any more (their process died).
ADOPT_INTERVAL_S = 5.0
ADOPT_GRACE_S = 30.0


@dataclass(frozen=True)
class JobEvent:
    """One thing a watcher is told: `kind` is status, progress or preview."""

    kind: str
    job: Job
    preview_png: bytes | None = None


@dataclass
class _Running:
    """What only this process knows about an unfinished job."""

    preview_png: bytes | None = None
    preview_at: float = 0.0


class JobManager:
    """Submits jobs to the generation service, records their life in the store, and lets callers watch them."""

    def __init__(
        self,
        store: JobStore,
        service: GenerationService,
        input_dir: Path,
        output_dir: Path,
        retention_s: float,
        sole_process: bool = True,
    ) -> None:
        """`sole_process`: no other process shares the store, so a job it left unfinished can never finish
        (with QUEUE_BACKEND=celery, other web processes may still be following theirs)."""
        self.store, self.service = store, service
        self.input_dir, self.output_dir, self.retention_s = input_dir, output_dir, retention_s
        self._running: dict[str, _Running] = {}
        self._changed = threading.Condition()
        self._version = 0
        self._closed = threading.Event()
        self._sole_process = sole_process
        interrupted = store.fail_unfinished(INTERRUPTED) if sole_process else 0
        if interrupted:
            log.warning("%d job(s) left unfinished by the previous run were marked failed", interrupted)
        try:
            self.remove_expired()
        except ServiceError as error:  # a shared store out of reach (Redis down): the janitor tries again
            log.warning("expired jobs not removed at start-up: %s", error.message)
        self._janitor = threading.Thread(target=self._remove_expired_periodically, name="job-janitor", daemon=True)
        self._janitor.start()
        if not sole_process:
            threading.Thread(target=self._adopt_orphans_periodically, name="job-adopter", daemon=True).start()

    def submit(self, owner: str, job_id: str, fields: BaseModel, upload: bytes) -> Job:
        """Record the job, then submit it; refused (QueueFull, StorageFull, a bad upload...), it leaves no
        record and no file. The seed is drawn here, so that the record shows it from the start."""
        if fields.seed is None:
            fields = fields.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
        job = Job(
            id=job_id, owner=owner, status=JobStatus.QUEUED, step=0, total=0, seed=fields.seed, created_at=time.time()
        )
        self.store.add(job)
        self._running[job_id] = _Running()
        try:
            submission = self.service.submit(fields, upload, owner, job_id, partial(self._on_event, job_id))
        except ServiceError:
            self._running.pop(job_id, None)
            self.store.delete(job_id)
            raise
        self.store.update(job_id, input_file=submission.input_file)
        submission.future.add_done_callback(partial(self._finish, job_id))
        return self.store.get(job_id)

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
        # A queued job's future cancels (and _finish records it); a running one stops at its next step.
        if self.service.cancel(job_id, owner) and job_id not in self._running:
            # Another process of the service submitted it (QUEUE_BACKEND=celery): it never runs now.
            self._record(job_id, status=JobStatus.CANCELED, error=CANCELED_QUEUED, finished_at=time.time())
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
            # Another host answered the job (QUEUE_BACKEND=celery): the store keeps a copy.
            kept = self.store.get_result(job_id)
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
        while not job.finished:
            # With a shared store (QUEUE_BACKEND=celery) another process may record the job's changes: look
            # there often. Alone, every change comes through this process and wakes the wait.
            here = job_id in self._running and self._sole_process
            with self._changed:
                self._changed.wait_for(partial(self._changed_since, seen), heartbeat_s if here else STORE_POLL_S)
                news, seen = self._version != seen, self._version
            if self._closed.is_set():
                return
            latest = self.store.get(job_id) if news or not here else job
            if latest is None:
                return
            told = False
            if latest.status != job.status:
                told = True
                yield JobEvent("status", latest)
            elif latest.step != job.step:
                told = True
                yield JobEvent("progress", latest)
            preview = self._latest_preview(job_id)
            if preview and preview != sent_preview and not latest.finished:
                sent_preview, told = preview, True
                yield JobEvent("preview", latest, sent_preview)
            if told:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= heartbeat_s:
                quiet_since = time.monotonic()
                yield None
            job = latest

    def _latest_preview(self, job_id: str) -> bytes | None:
        running = self._running.get(job_id)
        if running is not None:
            return running.preview_png
        # Followed by another web process (QUEUE_BACKEND=celery): it shares its previews through the store.
        return self.store.get_preview(job_id)

    def _changed_since(self, seen: int) -> bool:
        return self._version != seen or self._closed.is_set()

    def remove_expired(self) -> int:
        """Delete jobs that finished longer than the retention period ago, the record first: a job is never
        listed without its files (a crash in between leaves only unlisted files)."""
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

    def _adopt_orphans_periodically(self) -> None:
        """Jobs whose web process died are followed by another one (QUEUE_BACKEND=celery): nothing is lost."""
        while not self._closed.wait(ADOPT_INTERVAL_S):
            try:
                for job in self.store.unfinished():
                    # A job just taken is not an orphan: its process takes its lease within moments.
                    if job.id in self._running or time.time() - job.created_at < ADOPT_GRACE_S:
                        continue
                    self._running[job.id] = _Running()
                    future = self.service.adopt(job.id, job.owner, partial(self._on_event, job.id))
                    if future is None:
                        self._running.pop(job.id, None)
                    else:
                        future.add_done_callback(partial(self._finish, job.id))
            except Exception:
                log.exception("adopting jobs whose web process stopped failed")

    def _on_event(self, job_id: str, event: GenerationEvent) -> None:
        """Runs on the GPU's thread: record progress, stop a canceled run."""
        running = self._running.get(job_id)
        if isinstance(event, Started):
            self._record(job_id, status=JobStatus.RUNNING, step=0, total=event.total, started_at=time.time())
            return
        if running is not None and time.monotonic() - running.preview_at >= PREVIEW_INTERVAL_S:
            running.preview_at = time.monotonic()
            running.preview_png = encode_png(thumbnail(event.preview(), PREVIEW_SIZE))
            self.store.put_preview(job_id, running.preview_png)
        self._record(job_id, step=event.step, total=event.total)

    def _finish(self, job_id: str, future) -> None:
        """The job's future is done: record how it ended (the service saved its output already)."""
        if future.cancelled():
            changes = {"status": JobStatus.CANCELED, "error": CANCELED_QUEUED}
        elif isinstance(error := future.exception(), GenerationCanceled):
            changes = {"status": JobStatus.CANCELED, "error": error.message}
        elif isinstance(error, ServiceError):
            changes = {"status": JobStatus.FAILED, "error": error.message}
        elif error is not None:
            changes = {"status": JobStatus.FAILED, "error": f"Generation failed ({type(error).__name__})."}
        else:
            output = future.result()
            self.store.put_result(job_id, output.data)
            job = self.store.get(job_id)
            changes = {
                "status": JobStatus.SUCCEEDED, "result_file": output.file_name, "result_type": output.mimetype,
                "step": job.total if job else 0,
            }
        self._running.pop(job_id, None)
        self._record(job_id, finished_at=time.time(), **changes)

    def _record(self, job_id: str, **changes: object) -> None:
        self.store.update(job_id, **changes)
        with self._changed:
            self._version += 1
            self._changed.notify_all()

