"""Runs one generation on the loaded pipelines: ControlNet text-to-image, then a low-strength refine."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
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

from stable_diffusion.pipeline_initialization import Pipelines

SCHEDULERS = {
    "unipc": (UniPCMultistepScheduler, "UniPC"),
    "dpmpp_2m": (DPMSolverMultistepScheduler, "DPM++ 2M"),
    "euler_a": (EulerAncestralDiscreteScheduler, "Euler a"),
    "euler": (EulerDiscreteScheduler, "Euler"),
    "ddim": (DDIMScheduler, "DDIM"),
}
# Animated GIF frames go through the pipeline this many at a time.
FRAME_BATCH_SIZE = 4

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
    """Owns the pipelines; not thread-safe, so exactly one worker thread calls `run`."""

    def __init__(self, pipelines: Pipelines) -> None:
        self.pipelines = pipelines
        self._schedulers = {
            name: cls.from_config(pipelines.generate.scheduler.config)
            for name, (cls, _) in SCHEDULERS.items()
        }

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
        }

    def run(self, request: GenerationRequest, on_step: ProgressCallback | None = None) -> GenerationResult:
        started = time.perf_counter()
        # 1. Check inputs: the HTTP layer validated them; this guards callers that bypass it.
        _check_request(request)
        batches = math.ceil(len(request.control_images) / FRAME_BATCH_SIZE)
        progress = _StepCounter((request.steps + request.refine_steps) * batches, on_step, request.progress_gif)
        progress.start()

        # 2. Choose the sampler, shared by both passes.
        scheduler = self._schedulers[request.scheduler]
        self.pipelines.generate.scheduler = scheduler
        self.pipelines.refine.scheduler = scheduler

        images: list[Image.Image] = []
        for first in range(0, len(request.control_images), FRAME_BATCH_SIZE):
            batch = list(request.control_images[first : first + FRAME_BATCH_SIZE])
            # 3. Seed the noise on the CPU so a seed gives the same picture on every device;
            #    every frame of a GIF gets the same seed, so the frames share their noise.
            generators = [torch.Generator("cpu").manual_seed(request.seed) for _ in batch]
            # 4. Generate, following the edge map.
            generated = self._generate(request, batch, generators, progress)
            # 5. Refine: a low-strength img2img pass over the result, guided by the same edges.
            if request.refine_steps:
                generators = [torch.Generator("cpu").manual_seed(request.seed) for _ in batch]
                generated = self._refine(request, batch, generated, generators, progress)
            images.extend(generated)
        return GenerationResult(tuple(images), time.perf_counter() - started, tuple(progress.previews))

    def _generate(self, request, control_images, generators, progress) -> list[Image.Image]:
        width, height = request.size
        return self.pipelines.generate(
            image=control_images,
            width=width,
            height=height,
            **_shared_arguments(request, len(control_images), generators, progress),
        ).images

    def _refine(self, request, control_images, images, generators, progress) -> list[Image.Image]:
        return self.pipelines.refine(
            image=images,
            control_image=control_images,
            strength=request.refine_strength,
            **_shared_arguments(request, len(control_images), generators, progress),
        ).images


def _shared_arguments(request: GenerationRequest, batch_size: int, generators, progress) -> dict:
    """What both passes take alike: prompts, guidance, ControlNet weighting, seeds, the step callback."""
    return {
        "prompt": [request.prompt] * batch_size,
        "negative_prompt": [request.negative_prompt] * batch_size,
        "num_inference_steps": request.steps,
        "guidance_scale": float(request.guidance_scale),
        "controlnet_conditioning_scale": float(request.sensitivity),
        "control_guidance_start": float(request.control_start),
        "control_guidance_end": float(request.control_end),
        "generator": generators,
        "callback_on_step_end": progress.callback,
    }


class _StepCounter:
    """Turns diffusers' per-pass step callbacks into one running count across passes and batches."""

    def __init__(self, total: int, on_step: ProgressCallback | None, keep_previews: bool) -> None:
        self.total, self.on_step, self.done = total, on_step, 0
        self.keep_previews = keep_previews
        self.previews: list[Image.Image] = []

    def start(self) -> None:
        if self.on_step is not None:
            self.on_step(0, self.total, None)

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.done = min(self.done + 1, self.total)
        latents = callback_kwargs["latents"][:1]
        if self.keep_previews:
            self.previews.append(decode_latents(pipe, latents)[0])
        if self.on_step is not None:
            self.on_step(self.done, self.total, lambda: decode_latents(pipe, latents)[0])
        return callback_kwargs


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """What the latents look like now, through the pipeline's own VAE."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil")


def _check_request(request: GenerationRequest) -> None:
    if not request.control_images:
        raise ValueError("control_images is empty")
    if any(image.size != request.size for image in request.control_images):
        raise ValueError("control_images differ in size")
    if request.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {request.scheduler!r}")
    width, height = request.size
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
