"""Asynchronous jobs: records in SQLite, runs on the shared generation worker, live progress for watchers."""

from __future__ import annotations

import io
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from service.generation import render_output
from service.storage import new_file_stem, write_atomically
from service.worker import GenerationWorker
from stable_diffusion.errors import Conflict, GenerationCanceled, Gone, NotFound, ServiceError, StorageFull
from stable_diffusion.image_processing import FILE_EXTENSIONS, DecodedImage
from stable_diffusion.pipeline_service import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = frozenset({"succeeded", "failed", "canceled"})
INTERRUPTED = "The server stopped before this job finished; submit it again."
# Watchers get a preview picture at most this often, this many pixels on its longer side.
PREVIEW_INTERVAL_S = 1.0
PREVIEW_SIZE = 256

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
    status: str
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

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class JobEvent:
    """One thing a watcher is told: `kind` is status, progress or preview."""

    kind: str
    job: Job
    preview_png: bytes | None = None


class JobStore:
    """The job records, one SQLite file; safe to call from any thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._columns = [field.name for field in fields(Job)]

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
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*changes.values(), job_id])

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def finished_before(self, moment: float) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(self._columns)} FROM jobs WHERE finished_at < ?", (moment,)
            ).fetchall()
        return [Job(*row) for row in rows]

    def fail_unfinished(self, message: str) -> int:
        """Jobs a previous process left queued or running can never finish: mark them failed."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE status IN ('queued', 'running')",
                (message, time.time()),
            )
        return cursor.rowcount

    def count_by_status(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | dict(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class _Running:
    """What only this process knows about an unfinished job."""

    future: Future
    cancel_requested: bool = False
    preview_png: bytes | None = None
    preview_at: float = 0.0


class JobManager:
    """Submits jobs to the worker, records their life in the store, and lets callers watch them."""

    def __init__(
        self,
        store: JobStore,
        worker: GenerationWorker,
        input_dir: Path,
        output_dir: Path,
        retention_s: float,
    ) -> None:
        self.store, self.worker = store, worker
        self.input_dir, self.output_dir, self.retention_s = input_dir, output_dir, retention_s
        self._running: dict[str, _Running] = {}
        self._changed = threading.Condition()
        self._version = 0
        # Rendering and saving results happens here, off the worker thread that owns the GPU.
        self._finisher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="job-finisher")
        self._closed = threading.Event()
        interrupted = store.fail_unfinished(INTERRUPTED)
        if interrupted:
            log.warning("%d job(s) left unfinished by the previous run were marked failed", interrupted)
        self.remove_expired()
        self._janitor = threading.Thread(target=self._remove_expired_periodically, name="job-janitor", daemon=True)
        self._janitor.start()

    def submit(self, owner: str, request: GenerationRequest, upload: DecodedImage, upload_data: bytes) -> Job:
        """Queue a job (its id is `request.request_id`); QueueFull and StorageFull propagate and leave no record."""
        stem = new_file_stem()
        job = Job(
            id=request.request_id,
            owner=owner,
            status="queued",
            step=0,
            total=0,
            seed=request.seed,
            input_file=f"{stem}.{FILE_EXTENSIONS[upload.format]}",
            created_at=time.time(),
        )
        self.store.add(job)
        upload_path = self.input_dir / job.input_file
        # Saved before it is queued: a disk too full for the upload (507) costs no generation.
        try:
            write_atomically(upload_path, upload_data)
        except ServiceError:
            self.store.delete(job.id)
            raise
        with self._changed:
            try:
                future = self.worker.submit(request, partial(self._on_step, job.id), owner=owner)
            except ServiceError:
                self.store.delete(job.id)
                upload_path.unlink(missing_ok=True)
                raise
            self._running[job.id] = _Running(future)
        future.add_done_callback(lambda done: self._finisher.submit(self._finish, job.id, request, upload, done))
        return job

    def get(self, job_id: str, owner: str) -> Job:
        job = self.store.get(job_id)
        if job is None or job.owner != owner:
            # Another key's job answers exactly like a missing one.
            raise NotFound(f"No job {job_id!r}: it never existed, was removed after the retention period, "
                           "or belongs to another API key.")
        return job

    def queue_position(self, job_id: str) -> int | None:
        running = self._running.get(job_id)
        return None if running is None else self.worker.position(running.future)

    def cancel(self, job_id: str, owner: str) -> Job:
        """A queued job is canceled at once; a running one stops at its next step."""
        job = self.get(job_id, owner)
        if job.finished:
            raise Conflict(f"Job {job_id} has already {job.status}; there is nothing to cancel.")
        running = self._running.get(job_id)
        if running is None:
            return job
        running.cancel_requested = True
        if running.future.cancel():
            self._record(job_id, status="canceled", error="Canceled before it started.", finished_at=time.time())
        return self.store.get(job_id)

    def open_result(self, job_id: str, owner: str) -> tuple[BinaryIO, str, str]:
        """The result file, open for reading, with its MIME type and extension. Opened here, so a file
        removed under a job (by the retention janitor, or by hand) is a 410, not a failure to send it."""
        job = self.get(job_id, owner)
        if job.status != "succeeded":
            raise Conflict(
                f"Job {job_id} is {job.status}; its result exists only once it has succeeded"
                + ("." if job.finished else ": watch GET /jobs/<id>/events or poll GET /jobs/<id>.")
            )
        path = self.output_dir / job.result_file
        try:
            return path.open("rb"), job.result_type, path.suffix
        except FileNotFoundError:
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
        while not job.finished:
            with self._changed:
                self._changed.wait_for(partial(self._changed_since, seen), heartbeat_s)
                news, seen = self._version != seen, self._version
            if self._closed.is_set():
                return
            if not news:
                yield None
                continue
            latest = self.store.get(job_id)
            if latest is None:
                return
            if latest.status != job.status:
                yield JobEvent("status", latest)
            elif latest.step != job.step:
                yield JobEvent("progress", latest)
            running = self._running.get(job_id)
            if running is not None and running.preview_png is not sent_preview and running.preview_png:
                sent_preview = running.preview_png
                yield JobEvent("preview", latest, sent_preview)
            job = latest

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
                    (folder / name).unlink(missing_ok=True)
        return len(expired)

    def close(self) -> None:
        self._closed.set()
        with self._changed:
            self._changed.notify_all()
        self._finisher.shutdown(wait=True)
        self._janitor.join(timeout=5)
        self.store.close()

    def _remove_expired_periodically(self) -> None:
        interval = min(60.0, max(self.retention_s / 4, 0.5))
        while not self._closed.wait(interval):
            try:
                self.remove_expired()
            except Exception:
                log.exception("removing expired jobs failed")

    def _on_step(self, job_id: str, done: int, total: int, preview) -> None:
        """Runs on the worker thread after every step: record progress, stop a canceled run."""
        running = self._running.get(job_id)
        if running is not None and running.cancel_requested:
            raise GenerationCanceled("Canceled while running.")
        if done == 0:
            self._record(job_id, status="running", step=0, total=total, started_at=time.time())
            return
        if running is not None and preview is not None and time.monotonic() - running.preview_at >= PREVIEW_INTERVAL_S:
            running.preview_at = time.monotonic()
            running.preview_png = _small_png(preview())
        self._record(job_id, step=done, total=total)

    def _finish(self, job_id: str, request: GenerationRequest, upload: DecodedImage, future: Future) -> None:
        try:
            if future.cancelled():
                changes = {"status": "canceled", "error": "Canceled before it started."}
            elif isinstance(error := future.exception(), GenerationCanceled):
                changes = {"status": "canceled", "error": error.message}
            elif isinstance(error, ServiceError):
                changes = {"status": "failed", "error": error.message}
            elif error is not None:
                changes = {"status": "failed", "error": f"Generation failed ({type(error).__name__})."}
            else:
                changes = self._save_result(request, future.result(), upload)
        except ServiceError as exc:
            changes = {"status": "failed", "error": exc.message}
        except Exception:
            log.exception("job %s: saving the result failed", job_id)
            changes = {"status": "failed", "error": f"Saving the result failed; the server logged it under {job_id}."}
        self._running.pop(job_id, None)
        self._record(job_id, finished_at=time.time(), **changes)

    def _save_result(self, request: GenerationRequest, result: GenerationResult, upload: DecodedImage) -> dict:
        output = render_output(request, result, upload, self.worker.service.model_name)
        name = f"{new_file_stem()}.{output.extension}"
        write_atomically(self.output_dir / name, output.data)
        job = self.store.get(request.request_id)
        return {"status": "succeeded", "result_file": name, "result_type": output.mimetype, "step": job.total}

    def _record(self, job_id: str, **changes: object) -> None:
        self.store.update(job_id, **changes)
        with self._changed:
            self._version += 1
            self._changed.notify_all()


def _small_png(image: Image.Image) -> bytes:
    preview = image.copy()
    preview.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    buffer = io.BytesIO()
    preview.save(buffer, format="PNG")
    return buffer.getvalue()


def describe(job: Job, position: int | None) -> dict[str, object]:
    """The job as callers see it (no owner, no file names). `queue_position` is always there, so a
    client can read it without checking: null once the job left the queue (running or finished)."""
    shown = {
        "id": job.id,
        "status": job.status,
        "progress": {"step": job.step, "total": job.total},
        "queue_position": position if job.status == "queued" else None,
        "seed": job.seed,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }
    if job.error:
        shown["error"] = job.error
    if job.result_type:
        shown["result_type"] = job.result_type
    return shown


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1000):03d}Z"

