"""The generation service in this process: one worker thread owns the model (loaded on that thread, so
torch is imported only once the service is built), HTTP threads decode uploads and wait for futures."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from functools import partial

from pydantic import BaseModel

from service.errors import ServiceError
from service.interface import (
    Description,
    GenerationService,
    RenderedOutput,
    ResultObserver,
    ServiceState,
    Submission,
    process_name,
)
from service.jobs.recording import JobRecorder
from service.rendering import render_output
from service.settings import Settings
from service.storage import write_atomically
from service.uploads import Prepared, UploadDesk
from service.worker import GenerationWorker, ModelRunner
from stable_diffusion.config import ModelConfig, SpeedConfig
from stable_diffusion.image_processing import DecodeLimits
from stable_diffusion.recipe import EventHandler, GenerationResult


class LocalGenerationService(GenerationService):
    def __init__(self, settings: Settings, worker: GenerationWorker) -> None:
        self._worker = worker
        self._uploads = upload_desk(settings)
        self._output_dir = settings.output_dir
        self._output_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def start(
        cls, settings: Settings, on_load_failed: Callable[[Exception], None] | None = None
    ) -> LocalGenerationService:
        """The service for the configured model, which loads on the worker thread while this returns."""
        worker = GenerationWorker(
            partial(load_runner, settings),
            settings.queue_size,
            on_load_failed=on_load_failed,
            max_per_owner=settings.max_queued_per_key,
            max_batch=settings.batch_size,
            batch_wait_s=settings.batch_wait_ms / 1000,
        )
        return cls(settings, worker)

    @property
    def state(self) -> ServiceState:
        return self._worker.state

    @property
    def queue_depth(self) -> int:
        return self._worker.queue_depth

    @property
    def queue_size(self) -> int:
        return self._worker.queue_size

    def admit(self, owner: str) -> None:
        self._worker.check_room(owner)

    def counted(self, owner: str) -> AbstractContextManager[None]:
        return self._worker.counted(owner)

    def submit(self, fields: BaseModel, upload: bytes, owner: str, request_id: str) -> Submission:
        prepared = self._uploads.prepare(fields, upload, request_id)
        future = self._queue(prepared, owner, None)
        request = prepared.request
        cancel = partial(self.cancel, request_id, owner)
        return Submission(request_id, request.seed, request.size, prepared.input_file, future, cancel)

    def submit_job(self, fields: BaseModel, upload: bytes, owner: str, recorder: JobRecorder) -> None:
        prepared = self._uploads.prepare_job(fields, upload, recorder)
        self._queue(prepared, owner, recorder.on_event).add_done_callback(recorder.finished)

    def _queue(self, prepared: Prepared, owner: str, on_event: EventHandler | None) -> Future[RenderedOutput]:
        try:
            return self._worker.submit(prepared.request, on_event, owner=owner, finish=partial(self._finish, prepared))
        except ServiceError:
            self._uploads.discard(prepared)
            raise

    def _finish(self, prepared: Prepared, result: GenerationResult) -> RenderedOutput:
        """On a finisher thread: the output file, named like its upload, saved before the caller hears of it."""
        output = render_output(
            prepared.request, result, prepared.upload, self._worker.runner, prepared.stem, process_name()
        )
        write_atomically(self._output_dir / output.file_name, output.data)
        return output

    def edge_map(self, fields: BaseModel, upload: bytes) -> bytes:
        return self._uploads.edge_map(fields, upload)

    def position(self, request_id: str) -> int | None:
        return self._worker.position(request_id)

    def cancel(self, request_id: str, owner: str) -> bool:
        return self._worker.cancel(request_id)

    def describe(self) -> Description:
        return Description.model_validate(self._worker.runner.describe())

    def observe(self, observer: ResultObserver) -> None:
        self._worker.observe(observer)

    def close(self, timeout: float | None = None) -> None:
        self._worker.close(timeout)


def load_runner(settings: Settings) -> ModelRunner:
    """Load the configured model; runs on the worker thread, and is where torch is first imported."""
    from stable_diffusion.pipeline_initialization import load_pipelines
    from stable_diffusion.pipeline_runner import PipelineRunner

    return PipelineRunner(
        load_pipelines(model_config(settings)),
        max_batch=settings.batch_size,
        warm_up_sizes=settings.warm_up_sizes or ((settings.default_resolution,) * 2,),
    )


def upload_desk(settings: Settings) -> UploadDesk:
    limits = DecodeLimits(max_pixels=settings.max_image_pixels, max_frames=settings.max_gif_frames)
    return UploadDesk(settings.input_dir, limits, settings.max_concurrent_decodes)


def model_config(settings: Settings) -> ModelConfig:
    """The part of the settings that loading reads (stable_diffusion/ never sees the API keys)."""
    return ModelConfig(
        sd_model=settings.sd_model,
        controlnet_model=settings.controlnet_model,
        device=settings.device,
        dtype=settings.dtype,
        speed=SpeedConfig(channels_last=settings.channels_last, torch_compile=settings.torch_compile),
        allow_pickle_checkpoints=settings.allow_pickle_checkpoints,
        lora_dir=settings.lora_dir,
        lora_cache=settings.lora_cache,
    )
