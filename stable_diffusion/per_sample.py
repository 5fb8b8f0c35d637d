"""Per-request controls inside one denoising run: diffusers' pipelines take one guidance scale and one
ControlNet weight and window for a whole batch, and report progress for the batch; these give every
request of a batch its own, and its own step count, events and cancellation."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from stable_diffusion.errors import GenerationCanceled
from stable_diffusion.pipeline_initialization import Pipelines
from stable_diffusion.recipe import Canceled, EventHandler, GenerationRequest, Started, Stepped

# The pipeline runs with this guidance scale; the UNet hook applies each request's own. It only needs
# to be above 1 for the pipeline to compute both the conditional and the unconditional prediction.
PIPELINE_GUIDANCE = 2.0


@dataclass(frozen=True)
class Sample:
    """One picture to make: a still image, or one frame of a GIF; `index` is its request's place."""

    index: int
    request: GenerationRequest
    control_image: Image.Image



class PerSampleControls:
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


class BatchProgress:
    """Per-request step counts, previews and cancellations across the runs and passes of a batch."""

    def __init__(
        self, requests: list[GenerationRequest], on_events: list[EventHandler | None], chunks: list[list[Sample]]
    ) -> None:
        self.requests, self.on_events = requests, on_events
        self.done = [0] * len(requests)
        self.total = [0] * len(requests)
        for chunk in chunks:
            for index in {sample.index for sample in chunk}:
                self.total[index] += requests[index].steps + requests[index].refine_steps
        self.previews: list[list[Image.Image]] = [[] for _ in requests]
        self.canceled: dict[int, Canceled] = {}

    def start(self) -> None:
        for index in range(len(self.requests)):
            self._notify(index, Started(self.total[index]))

    def wanted(self, sample: Sample) -> bool:
        """False once the sample's request was canceled."""
        return sample.index not in self.canceled

    def callback_for(self, samples: list[Sample], waits: list[int]):
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
                preview = lambda latents=latents: decode_latents(pipe, latents)[0]  # noqa: E731
                self._notify(index, Stepped(self.done[index], self.total[index], preview))
            if all(index in self.canceled for index in first_position):
                raise GenerationCanceled("Canceled while running.")
            return callback_kwargs

        return callback

    def _notify(self, index: int, event: Started | Stepped) -> None:
        on_event = self.on_events[index]
        if on_event is None or index in self.canceled:
            return
        try:
            on_event(event)
        except GenerationCanceled as canceled:
            self.canceled[index] = Canceled(canceled.message)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """What the latents look like now, through the pipeline's own VAE."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil")
