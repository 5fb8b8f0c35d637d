"""The speed settings applied to loaded pipelines: PyTorch's fused attention, channels-last memory, and
torch.compile of the two models that run at every denoising step."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionControlNetPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from stable_diffusion.config import SpeedConfig

# Graphs kept per compiled model: one per picture size served (see _compiled_forward), with room to spare.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Speed:
    """What was applied, for GET /info and the start-up log."""

    attention: str
    channels_last: bool
    compile_mode: str

    def describe(self) -> dict[str, object]:
        return {"attention": self.attention, "channels_last": self.channels_last, "torch_compile": self.compile_mode}


def apply_speed_settings(
    pipe: StableDiffusionControlNetPipeline, device: torch.device, config: SpeedConfig
) -> Speed:
    """Make `pipe` fast on `device` without changing what it computes (beyond float rounding)."""
    convolutional = (pipe.unet, pipe.controlnet, pipe.vae)
    # torch's scaled_dot_product_attention picks flash or memory-efficient kernels where it can.
    for model in convolutional:
        model.set_attn_processor(AttnProcessor2_0())
    channels_last = config.channels_last == "on" or (config.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        for model in convolutional:
            model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        # Shapes repeat from request to request, so cuDNN's per-shape algorithm search pays off.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    if config.torch_compile != "off":
        # Both forwards are the same diffusers decorator's code, and torch keeps one cache of graphs per
        # code: two models times the picture sizes served outgrow its default limit of 8, after
        # which it silently falls back to eager Python. Newer torch takes the limit per compiled region
        # (its dynamo config is per thread there, and the worker may not be the thread that loads);
        # older torch has only the process-wide setting.
        options: dict[str, object] = {"mode": config.torch_compile}
        if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
            options |= {"isolate_recompiles": True, "recompile_limit": RECOMPILE_LIMIT}
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # `forward` rather than the module: the per-sample guidance and ControlNet-weight hooks stay in
        # eager Python, so their per-step values never become graph guards that force recompiles.
        for model in (pipe.unet, pipe.controlnet):
            model.forward = _compiled_forward(model, options)
    return Speed("sdpa", channels_last, config.torch_compile)


def _compiled_forward(model: torch.nn.Module, options: dict[str, object]) -> Callable:
    """`model.forward` compiled to as few graphs as the picture sizes allow. torch.compile guards on what a
    graph was compiled for and compiles another when that changes: the batch (made dynamic from the first
    call, rather than one graph for a batch of 1 and one more for any batch) and, between the two passes,
    the latents' layout (the refine pass's come out of the VAE's encoder channels-last) and the keywords
    passed (its pipeline leaves out `timestep_cond=None`). Evened out, both passes and every batch share
    one graph per picture size."""
    compiled = torch.compile(model.forward, **options)
    defaults_none = {
        name for name, parameter in inspect.signature(model.forward).parameters.items() if parameter.default is None
    }

    def forward(sample: torch.Tensor, *args, **kwargs):
        kwargs = {name: value for name, value in kwargs.items() if value is not None or name not in defaults_none}
        sample = sample.contiguous()
        for tensor in _batched_tensors(sample.shape[0], (sample, *args, *kwargs.values())):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled(sample, *args, **kwargs)

    return forward


def _batched_tensors(batch: int, values: Iterable[object]) -> Iterator[torch.Tensor]:
    """The tensors among `values`, and in their lists, tuples and dicts, whose first dimension is the batch."""
    for value in values:
        if isinstance(value, dict):
            yield from _batched_tensors(batch, value.values())
        elif isinstance(value, (list, tuple)):
            yield from _batched_tensors(batch, value)
        elif isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
            yield value
