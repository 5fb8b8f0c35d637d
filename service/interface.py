"""The seam between the HTTP layer and whatever generates: `GenerationService`, its states, and what it
hands back. web/ talks to this interface only; `LocalGenerationService` (local.py) runs the model in
this process, `CeleryGenerationService` (distributed/web_side.py) queues it for GPU worker processes."""

from __future__ import annotations

import enum
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.errors import GenerationTimeout, ServiceError

if TYPE_CHECKING:
    from service.jobs.recording import JobRecorder


class ServiceState(enum.StrEnum):
    """loading -> warming_up -> ready -> stopped, or -> failed when the model cannot load or warm up."""

    LOADING = "loading"
    WARMING_UP = "warming_up"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"
    # QUEUE_BACKEND=celery only: no GPU worker is connected (requests wait in the queue for one), or the
    # queue's Redis server cannot be reached (requests are refused until it is back).
    NO_WORKERS = "no_workers"
    UNREACHABLE = "unreachable"

    @property
    def takes_work(self) -> bool:
        """Requests are queued while the model loads and warms up, and refused once it failed or stopped."""
        return self not in (ServiceState.FAILED, ServiceState.STOPPED, ServiceState.UNREACHABLE)

    @property
    def not_ready_message(self) -> str:
        """What a caller is told while the service cannot generate (the one wording, used everywhere)."""
        return _NOT_READY[self]


_NOT_READY = {
    ServiceState.LOADING: "The model is still loading; retry in a few seconds.",
    ServiceState.WARMING_UP: "The model is warming up (and compiling, with TORCH_COMPILE set); retry in a few seconds.",
    ServiceState.READY: "The model is ready.",
    ServiceState.FAILED: "The model failed to load; the server log says why.",
    ServiceState.STOPPED: "The generation worker has stopped; the server is shutting down.",
    ServiceState.NO_WORKERS: (
        "No GPU worker is connected; requests wait in the queue until one starts "
        "(python -m stable_diffusion.gpu_worker)."
    ),
    ServiceState.UNREACHABLE: "The queue's Redis server (REDIS_URL) cannot be reached; retry in a few seconds.",
}


_Word = Annotated[str, StringConstraints(max_length=300)]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: _Word = Field(description="a single file's name without its suffix, or the hub id, folder or built-in model")
    size_bytes: int | None = Field(
        ge=0, description="a single file's size; null for a hub id, folder or built-in model"
    )
    sha256: Annotated[str, StringConstraints(pattern="^[0-9a-f]{64}$")] | None = Field(
        description="a single file's SHA-256 (AUTOMATIC1111's Model hash is its first 10 digits); null for "
        "anything else, and until the server has hashed the file"
    )


class ModelFiles(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sd_model: ModelEntry
    controlnet_model: ModelEntry


class Description(BaseModel):
    """What generates, as `GenerationService.describe` tells it: GET /info and /models answer it. In celery mode
    it comes from a GPU worker's heartbeat in Redis, so it is checked field by field, like anything read there."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: _Word
    random_weights: bool = Field(
        False, description="the model is a built-in one with random weights (SD_MODEL=tiny): its pictures are noise "
        "shaped by the edges, for trying and testing the service"
    )
    family: _Word
    device: _Word
    dtype: _Word
    schedulers: list[_Word] = Field(max_length=100)
    max_batch: int = Field(ge=1)
    attention: _Word
    channels_last: bool
    torch_compile: _Word
    warm_up_seconds: float | None = Field(ge=0)
    warm_up_sizes: list[_Word] = Field(max_length=100)
    model_files: ModelFiles
    gpu_workers: int | None = Field(
        None, ge=1, description="QUEUE_BACKEND=celery only: the GPU workers ready (absent in local mode)"
    )


def process_name() -> str:
    """host:pid: how a process that runs the model is named in X-Worker, api.log and /metrics."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class RenderedOutput:
    """A finished generation as the caller gets it: the file's bytes, saved as `file_name` in OUTPUT_DIR."""

    data: bytes
    mimetype: str
    file_name: str
    seconds: float
    # The process that ran the model (process_name()): answered as X-Worker and logged.
    worker: str
    # Pictures generated for it (a GIF's frames).
    images: int = 1


@dataclass(frozen=True)
class Submission:
    """A request the service took: what is known at once (its seed, output size and the saved upload)
    and the future of its output."""

    request_id: str
    seed: int
    size: tuple[int, int]
    input_file: str
    future: Future[RenderedOutput]
    # The service's cancel(request_id, owner) for this request.
    cancel: Callable[[], bool]

    def wait(self, timeout_s: float) -> RenderedOutput:
        """The output, or GenerationTimeout after `timeout_s`; the request is then canceled: a queued one
        leaves the queue, a running one stops at its next step, and no output is saved for nobody."""
        try:
            return self.future.result(timeout=timeout_s)
        except FutureTimeout:
            try:
                self.cancel()
            except ServiceError:  # the queue out of reach: the timeout is still what the caller hears
                pass
            raise GenerationTimeout(
                f"Generation did not finish within {timeout_s:g} s (GENERATION_TIMEOUT_S); retry later or with "
                "fewer steps."
            ) from None


@dataclass(frozen=True)
class Generated:
    """What metrics hear of each successful generation."""

    seconds: float
    images: int


# Called after every successful generation; metrics listen here.
ResultObserver = Callable[[Generated], None]


class GenerationService(ABC):
    """Takes validated fields and an upload, and generates: decode -> edge maps -> queue -> generate ->
    render -> save, in this order, behind one call. Errors are ServiceErrors carrying their status."""

    @property
    @abstractmethod
    def state(self) -> ServiceState: ...

    @property
    @abstractmethod
    def queue_depth(self) -> int:
        """Requests waiting to run."""

    @property
    @abstractmethod
    def queue_size(self) -> int:
        """The most that may wait; beyond it, QueueFull."""

    @abstractmethod
    def admit(self, owner: str) -> None:
        """Raise now what `submit` would for `owner` (QueueFull, TooManyRequests, ModelNotReady), so that
        a request is refused before the costly part: reading and decoding its upload."""

    @abstractmethod
    def counted(self, owner: str) -> AbstractContextManager[None]:
        """Count work done outside the queue (an edge map) against `owner`'s share of requests in flight."""

    @abstractmethod
    def submit(self, fields: BaseModel, upload: bytes, owner: str, request_id: str) -> Submission:
        """Decode `upload`, save it in INPUT_DIR, queue the generation (the upload is saved first: a full
        disk costs no generation). Raises the ServiceError that refuses the request."""

    @abstractmethod
    def submit_job(self, fields: BaseModel, upload: bytes, owner: str, recorder: JobRecorder) -> None:
        """As `submit`, for the job `recorder.job_id`: whoever runs it records its life with `recorder`
        (in this process, or on a GPU worker with a recorder of its own on the shared store)."""

    @abstractmethod
    def edge_map(self, fields: BaseModel, upload: bytes) -> bytes:
        """The PNG of the Canny edge map that `submit` would generate from."""

    @abstractmethod
    def position(self, request_id: str) -> int | None:
        """How many requests wait ahead of this one (0: next), or None once it left the queue."""

    @abstractmethod
    def cancel(self, request_id: str, owner: str) -> bool:
        """A queued request leaves the queue now and never runs (True); a running one stops at its next
        step (False). Works for a request submitted by any process of the service."""

    @abstractmethod
    def describe(self) -> Description:
        """What generates (model, device, dtype, samplers, speed settings); ModelNotReady until it is loaded."""

    def gpu_workers(self) -> list[dict] | None:
        """The GPU worker processes that serve this one, each as it describes itself; None when the model
        runs in this process."""
        return None

    @abstractmethod
    def observe(self, observer: ResultObserver) -> None: ...

    @abstractmethod
    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work (outputs saved), then stop."""
