"""The speed settings applied to loaded pipelines: PyTorch's fused attention, channels-last memory, and
torch.compile of the two models that run at every denoising step."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionControlNetPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from stable_diffusion.config import SpeedConfig

# Graphs kept per compiled model: batch sizes, both passes, a few picture sizes.
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
        # code: two models times two passes times the batch shapes outgrow its default limit of 8, after
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
            model.forward = torch.compile(model.forward, **options)
    return Speed("sdpa", channels_last, config.torch_compile)
