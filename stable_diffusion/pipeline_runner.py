"""The pipeline runner: runs batches of requests on the loaded pipelines, ControlNet text-to-image then a
low-strength refine, each request with its own controls (per_sample.py)."""

from __future__ import annotations

import logging
import time

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from stable_diffusion.checkpoints import ModelFile
from stable_diffusion.errors import GenerationCanceled, GenerationOutOfMemory
from stable_diffusion.lora_library import LoraLibrary, family
from stable_diffusion.loras import LoraAdapters
from stable_diffusion.per_sample import PIPELINE_GUIDANCE, BatchProgress, PerSampleControls, Sample
from stable_diffusion.pipeline_initialization import Pipelines
from stable_diffusion.recipe import Canceled, EventHandler, GenerationRequest, GenerationResult
from stable_diffusion.staggered_starts import StaggeredStarts, start_step

# The diffusers scheduler behind each sampler name of recipe.SAMPLERS.
SCHEDULERS = {
    "unipc": UniPCMultistepScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "ddim": DDIMScheduler,
}

log = logging.getLogger(__name__)


class PipelineRunner:
    """Owns the pipelines; not thread-safe, so exactly one worker thread calls `run` and `run_batch`."""

    def __init__(
        self, pipelines: Pipelines, max_batch: int = 8, warm_up_sizes: tuple[tuple[int, int], ...] = ((512, 512),)
    ) -> None:
        self.pipelines = pipelines
        self.max_batch = max_batch
        self.warm_up_sizes = warm_up_sizes
        self.warm_up_seconds: float | None = None
        self._schedulers = {
            name: scheduler.from_config(pipelines.generate.scheduler.config) for name, scheduler in SCHEDULERS.items()
        }
        self._per_sample = PerSampleControls(pipelines)
        self._loras = LoraAdapters(pipelines.generate, LoraLibrary(pipelines.lora_dir), pipelines.lora_cache)

    @property
    def model_name(self) -> str:
        return self.pipelines.model_name

    @property
    def model_hash(self) -> str | None:
        """AUTOMATIC1111's `Model hash` of a single-file SD_MODEL; None for a folder or hub model."""
        sd_file = self.pipelines.sd_file
        return sd_file.short_hash if sd_file else None

    def describe(self) -> dict[str, object]:
        """What runs the generations, for GET /info."""
        return {
            "model": self.pipelines.model_name,
            "random_weights": self.pipelines.random_weights,
            "family": family(self.pipelines.generate.unet.config.cross_attention_dim),
            "device": str(self.pipelines.device),
            "dtype": str(self.pipelines.dtype).removeprefix("torch."),
            "schedulers": list(SCHEDULERS),
            "max_batch": self.max_batch,
            **self.pipelines.speed.describe(),
            "warm_up_seconds": None if self.warm_up_seconds is None else round(self.warm_up_seconds, 3),
            "warm_up_sizes": _sizes(self.warm_up_sizes) if self.pipelines.needs_warm_up else [],
            "model_files": {
                "sd_model": _model_file(self.pipelines.names[0], self.pipelines.sd_file),
                "controlnet_model": _model_file(self.pipelines.names[1], self.pipelines.controlnet_file),
            },
        }

    def warm_up(self) -> None:
        """Where the pipelines need it (compiled models, a GPU), generate at each warm-up size, both
        passes, for 1, 2 and `max_batch` pictures, so that requests of those sizes never wait for a
        compilation. The compiled models take any batch from their first run (acceleration.py); the full
        batch covers the guards that graph may take on large batches, and gives a GPU its kernels for it
        (a test checks that a batch of 3 compiles nothing after warming up with 1, 2 and 4). Another
        picture size compiles on its first request."""
        if not self.pipelines.needs_warm_up:
            return
        started = time.perf_counter()
        batches = sorted({1, min(2, self.max_batch), self.max_batch})
        for size in self.warm_up_sizes:
            edges = Image.new("RGB", size)
            request = GenerationRequest("warm-up", (edges,), "warm-up", steps=4, refine_strength=0.5)
            for batch in batches:
                self.run_batch([request] * batch, [None] * batch)
        self.warm_up_seconds = time.perf_counter() - started
        log.info(
            "warm-up took %.1f s (torch.compile: %s; %s, batches of %s)", self.warm_up_seconds,
            self.pipelines.speed.compile_mode, " and ".join(_sizes(self.warm_up_sizes)),
            " and ".join(map(str, batches)),
        )

    def run(self, request: GenerationRequest, on_event: EventHandler | None = None) -> GenerationResult:
        outcome = self.run_batch([request], [on_event])[0]
        if isinstance(outcome, Canceled):
            raise GenerationCanceled(outcome.message)
        return outcome

    def run_batch(
        self, requests: list[GenerationRequest], on_events: list[EventHandler | None]
    ) -> list[GenerationResult | Canceled]:
        """Generate for requests that share size, steps and sampler, in denoising runs of at most
        `max_batch` pictures (GIF frames count one each). Every request keeps its own prompts, seed,
        guidance, ControlNet weight and window, and refine strength (refining in one run, each sample
        from its own start: see staggered_starts.py). A request whose event handler raises
        GenerationCanceled drops out and is answered Canceled. Out of GPU memory, the cache is emptied
        and GenerationOutOfMemory raised for the whole batch."""
        try:
            return self._run_batch(requests, on_events)
        except torch.OutOfMemoryError:
            log.exception("out of GPU memory for %s", ", ".join(request.request_id for request in requests))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise GenerationOutOfMemory(
                "The GPU ran out of memory for this request; retry with a lower resolution or fewer GIF frames.",
                retry_after=5,
            ) from None

    def _run_batch(
        self, requests: list[GenerationRequest], on_events: list[EventHandler | None]
    ) -> list[GenerationResult | Canceled]:
        started = time.perf_counter()
        # 1. Check inputs: the HTTP layer validated them; this guards callers that bypass it. Then make the
        #    batch's LoRA set the active one (none: adapters off).
        _check_batch(requests)
        loras = self._loras.activate(requests[0].loras)
        samples = [
            Sample(index, request, image)
            for index, request in enumerate(requests)
            for image in request.control_images
        ]
        chunks = [samples[first : first + self.max_batch] for first in range(0, len(samples), self.max_batch)]
        progress = BatchProgress(requests, on_events, chunks)
        progress.start()

        # 2. Choose the sampler, shared by both passes.
        scheduler = self._schedulers[requests[0].scheduler]
        self.pipelines.generate.scheduler = scheduler
        self.pipelines.refine.scheduler = scheduler

        images: list[list[Image.Image]] = [[] for _ in requests]
        for chunk in chunks:
            chunk = [sample for sample in chunk if progress.wanted(sample)]
            if not chunk:
                continue
            # 3. Generate, following each sample's edge map.
            try:
                generated = self._generate(chunk, progress)
            except GenerationCanceled:
                continue  # every sample of this run was canceled
            # 4. Refine: a low-strength img2img pass over the result, guided by the same edges, in one run
            #    whatever the samples' strengths (each starts at its own step). Only samples still wanted
            #    refine; should they all cancel during it, the others keep their first-pass pictures.
            refining = [i for i, sample in enumerate(chunk) if sample.request.refine_steps and progress.wanted(sample)]
            if refining:
                try:
                    refined = self._refine([chunk[i] for i in refining], [generated[i] for i in refining], progress)
                    for i, image in zip(refining, refined, strict=True):
                        generated[i] = image
                except GenerationCanceled:
                    pass
            for sample, image in zip(chunk, generated, strict=True):
                if progress.wanted(sample):
                    images[sample.index].append(image)
        seconds = time.perf_counter() - started
        return [
            progress.canceled.get(index)
            or GenerationResult(tuple(images[index]), seconds, tuple(progress.previews[index]), loras)
            for index in range(len(requests))
        ]

    def _generate(self, samples: list[Sample], progress: BatchProgress) -> list[Image.Image]:
        width, height = samples[0].request.size
        steps = samples[0].request.steps
        with self._per_sample.applied([sample.request for sample in samples], [0] * len(samples), steps):
            return self.pipelines.generate(
                image=[sample.control_image for sample in samples],
                width=width,
                height=height,
                **_shared_arguments(samples, progress),
            ).images

    def _refine(self, samples: list[Sample], images: list[Image.Image], progress) -> list[Image.Image]:
        steps = samples[0].request.steps
        starts = [start_step(steps, sample.request.refine_strength) for sample in samples]
        first = min(starts)
        refine = self.pipelines.refine
        shared_scheduler = refine.scheduler
        if len(set(starts)) > 1:
            refine.scheduler = StaggeredStarts(shared_scheduler, starts)
        try:
            with self._per_sample.applied([sample.request for sample in samples], starts, steps):
                return refine(
                    image=images,
                    control_image=[sample.control_image for sample in samples],
                    strength=max(sample.request.refine_strength for sample in samples),
                    **_shared_arguments(samples, progress, [start - first for start in starts]),
                ).images
        finally:
            refine.scheduler = shared_scheduler


def _shared_arguments(samples: list[Sample], progress: BatchProgress, waits: list[int] | None = None) -> dict:
    """What both passes take alike. Guidance and ControlNet weighting are set per sample by
    `PerSampleControls`, so the pipeline gets neutral values here. `waits[i]`: the steps of the run
    before sample `i` starts (refine strengths below the highest)."""
    return {
        "prompt": [sample.request.prompt for sample in samples],
        "negative_prompt": [sample.request.negative_prompt for sample in samples],
        "num_inference_steps": samples[0].request.steps,
        "guidance_scale": PIPELINE_GUIDANCE,
        "controlnet_conditioning_scale": 1.0,
        "control_guidance_start": 0.0,
        "control_guidance_end": 1.0,
        # Seeded on the CPU so that a seed gives the same picture on every device; every frame of a GIF
        # gets its request's seed, so the frames share their noise.
        "generator": [torch.Generator("cpu").manual_seed(sample.request.seed) for sample in samples],
        "callback_on_step_end": progress.callback_for(samples, waits or [0] * len(samples)),
    }


def _check_batch(requests: list[GenerationRequest]) -> None:
    if not requests:
        raise ValueError("no requests")
    first = requests[0]
    for request in requests:
        if not request.control_images:
            raise ValueError("control_images is empty")
        if any(image.size != first.size for image in request.control_images):
            raise ValueError("control_images differ in size")
        if (request.steps, request.scheduler, request.loras) != (first.steps, first.scheduler, first.loras):
            raise ValueError("a batch must share its steps, scheduler and LoRAs")
        if request.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {request.scheduler!r}")
    width, height = first.size
    if width % 8 or height % 8:
        raise ValueError(f"size {width}x{height} is not a multiple of 8")


def _model_file(name: str, model_file: ModelFile | None) -> dict:
    """A model as GET /models shows it: size and hash for a single file only."""
    if model_file is None:
        return {"name": name, "size_bytes": None, "sha256": None}
    return {"name": model_file.name, "size_bytes": model_file.size, "sha256": model_file.sha256}


def _sizes(sizes: tuple[tuple[int, int], ...]) -> list[str]:
    return [f"{width}x{height}" for width, height in sizes]
