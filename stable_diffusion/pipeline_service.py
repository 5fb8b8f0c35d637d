"""Runs one generation on the loaded pipelines: ControlNet text-to-image, then a low-strength refine."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from stable_diffusion.errors import GenerationCanceled
from stable_diffusion.pipeline_initialization import Pipelines
from stable_diffusion.staggered_starts import StaggeredStarts, start_step

SCHEDULERS = {
    "unipc": (UniPCMultistepScheduler, "UniPC"),
    "dpmpp_2m": (DPMSolverMultistepScheduler, "DPM++ 2M"),
    "euler_a": (EulerAncestralDiscreteScheduler, "Euler a"),
    "euler": (EulerDiscreteScheduler, "Euler"),
    "ddim": (DDIMScheduler, "DDIM"),
}
# Guidance is applied per sample by a hook on the UNet; the pipeline runs with this scale, which only
# needs to be above 1 for it to compute both the conditional and the unconditional prediction.
PIPELINE_GUIDANCE = 2.0

log = logging.getLogger(__name__)

# Called with (steps done, total steps, preview): once with 0 when the run starts, then after every
# denoising step. `preview()` decodes the first picture of the batch as it looks now (None at 0).
ProgressCallback = Callable[[int, int, Callable[[], Image.Image] | None], None]


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs, already validated; `control_images` are the Canny edge maps."""

    request_id: str
    control_images: tuple[Image.Image, ...]
    prompt: str
    negative_prompt: str = ""
    sensitivity: float = 1.0
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    control_start: float = 0.0
    control_end: float = 1.0
    refine_strength: float = 0.3
    scheduler: str = "unipc"
    progress_gif: bool = False
    # The caller's full recipe (thresholds and resolution included), written into the output's metadata.
    recipe: dict = field(default_factory=dict, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.control_images[0].size

    @property
    def refine_steps(self) -> int:
        """The steps img2img runs at this strength; under one step, refinement is skipped."""
        return int(self.steps * self.refine_strength)


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[Image.Image, ...]
    seconds: float
    # With `progress_gif`: the picture after every denoising step, decoded from the latents.
    step_previews: tuple[Image.Image, ...] = ()


class PipelineService:
    """Owns the pipelines; not thread-safe, so exactly one worker thread calls `run` and `run_batch`."""

    def __init__(
        self, pipelines: Pipelines, max_batch: int = 8, warm_up_sizes: tuple[tuple[int, int], ...] = ((512, 512),)
    ) -> None:
        self.pipelines = pipelines
        self.max_batch = max_batch
        self.warm_up_sizes = warm_up_sizes
        self.warm_up_seconds: float | None = None
        self._schedulers = {
            name: cls.from_config(pipelines.generate.scheduler.config)
            for name, (cls, _) in SCHEDULERS.items()
        }
        self._per_sample = _PerSampleControls(pipelines)

    @property
    def model_name(self) -> str:
        return self.pipelines.model_name

    def describe(self) -> dict[str, object]:
        """What runs the generations, for GET /info."""
        return {
            "model": self.pipelines.model_name,
            "device": str(self.pipelines.device),
            "dtype": str(self.pipelines.dtype).removeprefix("torch."),
            "schedulers": list(SCHEDULERS),
            "max_batch": self.max_batch,
            **self.pipelines.speed.describe(),
            "warm_up_seconds": None if self.warm_up_seconds is None else round(self.warm_up_seconds, 3),
            "warm_up_sizes": _sizes(self.warm_up_sizes) if self.pipelines.needs_warm_up else [],
        }

    def warm_up(self) -> None:
        """Where the pipelines need it (compiled models, a GPU), generate at each warm-up size, both
        passes, for 1, 2 and `max_batch` pictures, so that requests of those sizes never wait for a
        compilation. torch.compile first builds a graph for batch 1 alone; seeing the batch change, it
        builds one for any batch, and the full batch covers the guards that graph may take on large
        batches (a test checks that a batch of 3 compiles nothing after warming up with 1, 2 and 4).
        Another picture size compiles on its first request."""
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

    def run(self, request: GenerationRequest, on_step: ProgressCallback | None = None) -> GenerationResult:
        outcome = self.run_batch([request], [on_step])[0]
        if isinstance(outcome, GenerationCanceled):
            raise outcome
        return outcome

    def run_batch(
        self, requests: list[GenerationRequest], on_steps: list[ProgressCallback | None]
    ) -> list[GenerationResult | GenerationCanceled]:
        """Generate for requests that share size, steps and sampler, in denoising runs of at most
        `max_batch` pictures (GIF frames count one each). Every request keeps its own prompts, seed,
        guidance, ControlNet weight and window, and refine strength (refining in one run, each sample
        from its own start: see staggered_starts.py). A request whose `on_step` raises
        GenerationCanceled drops out; its entry in the answer is that exception."""
        started = time.perf_counter()
        # 1. Check inputs: the HTTP layer validated them; this guards callers that bypass it.
        _check_batch(requests)
        samples = [
            _Sample(index, request, image)
            for index, request in enumerate(requests)
            for image in request.control_images
        ]
        chunks = [samples[first : first + self.max_batch] for first in range(0, len(samples), self.max_batch)]
        progress = _BatchProgress(requests, on_steps, chunks)
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
            or GenerationResult(tuple(images[index]), seconds, tuple(progress.previews[index]))
            for index in range(len(requests))
        ]

    def _generate(self, samples: list[_Sample], progress: _BatchProgress) -> list[Image.Image]:
        width, height = samples[0].request.size
        steps = samples[0].request.steps
        with self._per_sample.applied([sample.request for sample in samples], [0] * len(samples), steps):
            return self.pipelines.generate(
                image=[sample.control_image for sample in samples],
                width=width,
                height=height,
                **_shared_arguments(samples, progress),
            ).images

    def _refine(self, samples: list[_Sample], images: list[Image.Image], progress) -> list[Image.Image]:
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


@dataclass(frozen=True)
class _Sample:
    """One picture to make: a still image, or one frame of a GIF; `index` is its request's place."""

    index: int
    request: GenerationRequest
    control_image: Image.Image


def _shared_arguments(samples: list[_Sample], progress: _BatchProgress, waits: list[int] | None = None) -> dict:
    """What both passes take alike. Guidance and ControlNet weighting are set per sample by
    `_PerSampleControls`, so the pipeline gets neutral values here. `waits[i]`: the steps of the run
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


class _PerSampleControls:
    """diffusers' pipelines take one guidance scale and one ControlNet weight and window for a whole
    batch; forward hooks on the (shared) UNet and ControlNet give every sample its own, as tensors.
    Sample `i` runs schedule steps `starts[i]` to `steps`; its ControlNet window is a share of those."""

    def __init__(self, pipelines: Pipelines) -> None:
        self._requests: list[GenerationRequest] | None = None
        self._starts: list[int] = []
        self._steps = self._step = 0
        pipelines.generate.controlnet.register_forward_hook(self._weigh_controlnet)
        pipelines.generate.unet.register_forward_hook(self._guide)

    @contextmanager
    def applied(self, requests: list[GenerationRequest], starts: list[int], steps: int):
        self._requests, self._starts, self._steps = requests, starts, steps
        self._step = min(starts)
        try:
            yield
        finally:
            self._requests = None

    def _weigh_controlnet(self, module, args, output):
        if self._requests is None:
            return output
        step = self._step
        self._step += 1
        weights = [
            _controlnet_weight(request, step - start, self._steps - start)
            for request, start in zip(self._requests, self._starts, strict=True)
        ]
        down, mid = output
        # The batch is [unconditional..., conditional...]: both halves get a sample's weight.
        scale = torch.tensor(weights * 2, dtype=mid.dtype, device=mid.device).view(-1, 1, 1, 1)
        return [residual * scale for residual in down], mid * scale

    def _guide(self, module, args, output):
        if self._requests is None:
            return output
        noise = output[0]
        unconditional, conditional = noise.chunk(2)
        # The pipeline then computes u + PIPELINE_GUIDANCE * (c' - u), which is u + g * (c - u).
        ratio = torch.tensor(
            [r.guidance_scale / PIPELINE_GUIDANCE for r in self._requests], dtype=noise.dtype, device=noise.device
        ).view(-1, 1, 1, 1)
        guided = unconditional + ratio * (conditional - unconditional)
        return (torch.cat([unconditional, guided]), *output[1:])


def _controlnet_weight(request: GenerationRequest, step: int, steps: int) -> float:
    """diffusers' ControlNet window: on for the steps inside [control_start, control_end] of the run."""
    if step < 0 or step / steps < request.control_start or (step + 1) / steps > request.control_end:
        return 0.0
    return request.sensitivity


class _BatchProgress:
    """Per-request step counts, previews and cancellations across the runs and passes of a batch."""

    def __init__(
        self, requests: list[GenerationRequest], on_steps: list[ProgressCallback | None], chunks: list[list[_Sample]]
    ) -> None:
        self.requests, self.on_steps = requests, on_steps
        self.done = [0] * len(requests)
        self.total = [0] * len(requests)
        for chunk in chunks:
            for index in {sample.index for sample in chunk}:
                self.total[index] += requests[index].steps + requests[index].refine_steps
        self.previews: list[list[Image.Image]] = [[] for _ in requests]
        self.canceled: dict[int, GenerationCanceled] = {}

    def start(self) -> None:
        for index in range(len(self.requests)):
            self._notify(index, None)

    def wanted(self, sample: _Sample) -> bool:
        """False once the sample's request was canceled."""
        return sample.index not in self.canceled

    def callback_for(self, samples: list[_Sample], waits: list[int]):
        """The pipeline's step callback for a run of `samples`; sample `i` starts after `waits[i]` steps."""
        first_position = {}
        for position, sample in enumerate(samples):
            first_position.setdefault(sample.index, position)

        def callback(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            for index, position in first_position.items():
                if index in self.canceled or step < waits[position]:
                    continue
                self.done[index] += 1
                latents = callback_kwargs["latents"][position : position + 1]
                if self.requests[index].progress_gif:
                    self.previews[index].append(decode_latents(pipe, latents)[0])
                self._notify(index, lambda latents=latents: decode_latents(pipe, latents)[0])
            if all(index in self.canceled for index in first_position):
                raise GenerationCanceled("Canceled while running.")
            return callback_kwargs

        return callback

    def _notify(self, index: int, preview) -> None:
        on_step = self.on_steps[index]
        if on_step is None or index in self.canceled:
            return
        try:
            on_step(self.done[index], self.total[index], preview)
        except GenerationCanceled as canceled:
            self.canceled[index] = canceled


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """What the latents look like now, through the pipeline's own VAE."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil")


def _check_batch(requests: list[GenerationRequest]) -> None:
    if not requests:
        raise ValueError("no requests")
    first = requests[0]
    for request in requests:
        if not request.control_images:
            raise ValueError("control_images is empty")
        if any(image.size != first.size for image in request.control_images):
            raise ValueError("control_images differ in size")
        if (request.steps, request.scheduler) != (first.steps, first.scheduler):
            raise ValueError("a batch must share its steps and scheduler")
        if request.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {request.scheduler!r}")
    width, height = first.size
    if width % 8 or height % 8:
        raise ValueError(f"size {width}x{height} is not a multiple of 8")


def a1111_parameters(request: GenerationRequest, model_name: str) -> str:
    """The recipe in the `parameters` text format AUTOMATIC1111 writes, so its tools can read it."""
    width, height = request.size
    settings = {
        "Steps": request.steps,
        "Sampler": SCHEDULERS[request.scheduler][1],
        "CFG scale": request.guidance_scale,
        "Seed": request.seed,
        "Size": f"{width}x{height}",
        "Model": model_name,
        "Denoising strength": request.refine_strength,
        "ControlNet": "canny",
        "Control weight": request.sensitivity,
        "Guidance start": request.control_start,
        "Guidance end": request.control_end,
    }
    return "\n".join(
        [
            request.prompt,
            f"Negative prompt: {request.negative_prompt}",
            ", ".join(f"{key}: {value}" for key, value in settings.items()),
        ]
    )


def _sizes(sizes: tuple[tuple[int, int], ...]) -> list[str]:
    return [f"{width}x{height}" for width, height in sizes]
