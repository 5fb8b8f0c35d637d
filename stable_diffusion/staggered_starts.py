"""Samples of one img2img run that start denoising at different steps, each as if it ran alone.

An img2img strength sets where a sample's schedule starts: strength 0.5 of 20 steps runs the last 10,
strength 0.3 the last 6. Every sample follows the same timesteps once it has started, so samples of
different strengths can share the model calls of one run. What they cannot share is the sampler's
state (multistep history, step index, noise draws), so `StaggeredStarts` keeps one sampler per start
and stands in for the pipeline's scheduler: until a sample's start it is left alone, at its start it
gets its own noised latents, and from then on its own sampler steps it.
"""

from __future__ import annotations

import inspect

import torch


def start_step(steps: int, strength: float) -> int:
    """Where img2img at `strength` starts in a schedule of `steps` (diffusers' own formula)."""
    return steps - min(int(steps * strength), steps)


class StaggeredStarts:
    """The part of a diffusers scheduler that StableDiffusionControlNetImg2ImgPipeline uses, for a batch
    whose sample `i` starts at `starts[i]`. Hand the pipeline the strength of the earliest start."""

    def __init__(self, scheduler, starts: list[int]) -> None:
        if scheduler.order != 1:
            raise ValueError(f"{type(scheduler).__name__} takes {scheduler.order} model calls per step")
        self.config = scheduler.config
        self.order = 1
        self._first = min(starts)
        self._groups: dict[int, list[int]] = {}
        for position, start in enumerate(starts):
            self._groups.setdefault(start, []).append(position)
        self._samplers = {start: type(scheduler).from_config(scheduler.config) for start in self._groups}
        self._step_parameters = set(inspect.signature(scheduler.step).parameters)
        self._done = 0
        self._initial: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def timesteps(self) -> torch.Tensor:
        return self._samplers[self._first].timesteps

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        for sampler in self._samplers.values():
            sampler.set_timesteps(num_inference_steps, device=device)

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != self._first:
            raise ValueError(f"the pipeline starts at step {begin_index}, the earliest sample at {self._first}")
        for start, sampler in self._samplers.items():
            if hasattr(sampler, "set_begin_index"):  # DDIM goes by timestep values, not a step index
                sampler.set_begin_index(start)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Called once, by the pipeline, for the earliest start; later starts reuse its clean latents and
        noise, which the pipeline drew per sample from each sample's own generator."""
        self._initial = (original, noise)
        return self._samplers[self._first].add_noise(original, noise, timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        # Started samples stand at the same timestep, so every sampler scales alike; each started one
        # is called so that it counts the call as a sampler run alone would.
        scaled = sample
        for start, sampler in self._samplers.items():
            if self._first + self._done >= start:
                scaled = sampler.scale_model_input(sample, timestep)
        return scaled

    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None, return_dict: bool = False):
        stepped = sample.clone()
        for start, positions in self._groups.items():
            if self._first + self._done < start:
                continue
            index = torch.tensor(positions, device=sample.device)
            options = {}
            if "eta" in self._step_parameters:
                options["eta"] = eta
            if "generator" in self._step_parameters and generator is not None:
                options["generator"] = [generator[p] for p in positions] if isinstance(generator, list) else generator
            stepped[index] = self._samplers[start].step(
                model_output[index], timestep, sample[index], **options, return_dict=False
            )[0]
        self._done += 1
        self._start_due(stepped)
        return (stepped,)

    def _start_due(self, latents: torch.Tensor) -> None:
        """Samples that start at the next step get their clean latents noised to its timestep."""
        original, noise = self._initial
        for start, positions in self._groups.items():
            if start != self._first + self._done:
                continue
            index = torch.tensor(positions, device=latents.device)
            sampler = self._samplers[start]
            timestep = sampler.timesteps[start : start + 1].repeat(len(positions))
            latents[index] = sampler.add_noise(original[index], noise[index], timestep)
