"""The generation service in this process: one worker thread owns the model (loaded on that thread, so
torch is imported only once the service is built), HTTP threads decode uploads and wait for futures."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial

from pydantic import BaseModel

from service.interface import GenerationService, RenderedOutput, ResultObserver, ServiceState, Submission
from service.rendering import build_request, render_output
from service.settings import Settings
from service.storage import new_file_stem, write_atomically
from service.uploads import DecodeSlots
from service.worker import GenerationWorker, Generator
from stable_diffusion.config import ModelConfig, SpeedConfig
from stable_diffusion.errors import ServiceError
from stable_diffusion.image_processing import (
    FILE_EXTENSIONS,
    DecodedImage,
    DecodeLimits,
    decode_upload,
    encode_png,
    make_control_image,
)
from stable_diffusion.recipe import EventHandler, GenerationRequest, GenerationResult


class LocalGenerationService(GenerationService):
    def __init__(self, settings: Settings, worker: GenerationWorker) -> None:
        self._worker = worker
        self._input_dir, self._output_dir = settings.input_dir, settings.output_dir
        self._limits = DecodeLimits(max_pixels=settings.max_image_pixels, max_frames=settings.max_gif_frames)
        self._decode_slots = DecodeSlots(settings.max_concurrent_decodes)
        for directory in (self._input_dir, self._output_dir):
            directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def start(
        cls, settings: Settings, on_load_failed: Callable[[Exception], None] | None = None
    ) -> LocalGenerationService:
        """The service for the configured model, which loads on the worker thread while this returns."""
        worker = GenerationWorker(
            partial(load_generator, settings),
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

    def submit(
        self, fields: BaseModel, upload: bytes, owner: str, request_id: str, on_event: EventHandler | None = None
    ) -> Submission:
        with self._decode_slots.hold():
            decoded = decode_upload(upload, self._limits)
            request = build_request(request_id, fields, decoded)
            # What answering needs (format, GIF timing), without the pixels: a queued request keeps edge maps only.
            decoded = decoded.without_frames()
        stem = new_file_stem()
        input_file = f"{stem}.{FILE_EXTENSIONS[decoded.format]}"
        # Saved before it is queued: a disk too full for the upload (507) costs no generation.
        write_atomically(self._input_dir / input_file, upload)
        finish = partial(self._finish, request, decoded, stem)
        try:
            future = self._worker.submit(request, on_event, owner=owner, finish=finish)
        except ServiceError:
            (self._input_dir / input_file).unlink(missing_ok=True)
            raise
        return Submission(request_id, request.seed, request.size, input_file, future)

    def _finish(self, request: GenerationRequest, upload: DecodedImage, stem: str, result: GenerationResult):
        """On a finisher thread: the output file, named like its upload, saved before the caller hears of it."""
        rendered = render_output(request, result, upload, self._worker.generator.model_name)
        file_name = f"{stem}.{rendered.extension}"
        write_atomically(self._output_dir / file_name, rendered.data)
        return RenderedOutput(rendered.data, rendered.mimetype, file_name, result.seconds)

    def edge_map(self, fields: BaseModel, upload: bytes) -> bytes:
        with self._decode_slots.hold():
            decoded = decode_upload(upload, self._limits)
            first = decoded.frames[0]
            edges = make_control_image(first, fields.resolution, fields.low_threshold, fields.high_threshold)
        return encode_png(edges)

    def position(self, submission: Submission) -> int | None:
        return self._worker.position(submission.future)

    def describe(self) -> dict[str, object]:
        return self._worker.generator.describe()

    def observe(self, observer: ResultObserver) -> None:
        self._worker.observe(observer)

    def close(self, timeout: float | None = None) -> None:
        self._worker.close(timeout)


def load_generator(settings: Settings) -> Generator:
    """Load the configured model; runs on the worker thread, and is where torch is first imported."""
    from stable_diffusion.pipeline_initialization import load_pipelines
    from stable_diffusion.pipeline_service import Generator as PipelineGenerator

    return PipelineGenerator(
        load_pipelines(model_config(settings)),
        max_batch=settings.batch_size,
        warm_up_sizes=settings.warm_up_sizes or ((settings.default_resolution,) * 2,),
    )


def model_config(settings: Settings) -> ModelConfig:
    """The part of the settings that loading reads (stable_diffusion/ never sees the API keys)."""
    return ModelConfig(
        sd_model=settings.sd_model,
        controlnet_model=settings.controlnet_model,
        device=settings.device,
        dtype=settings.dtype,
        speed=SpeedConfig(channels_last=settings.channels_last, torch_compile=settings.torch_compile),
    )
