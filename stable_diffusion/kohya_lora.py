"""Writes LoRAs in kohya's layout (`lora_unet_…`, `lora_te_…`, as AUTOMATIC1111 users keep them) with random
weights, made with peft on copies of the models: the demo LoRA of `python -m stable_diffusion.demo_lora` (real
SD 1.5 LoRAs do not fit the tiny model), and the tests' LoRAs."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from transformers import CLIPTextModel

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# peft's random init moves the tiny model's 64 px picture by 0.004 on average, as little as another prompt does;
# four times that changes nearly every pixel (by 0.02 on average, a tenth of what another seed does), all finite.
LORA_STRENGTH = 4.0


def write_kohya_lora(
    unet: torch.nn.Module,
    text_encoder: CLIPTextModel,
    path: Path,
    rank: int = 4,
    seed: int = 0,
    text_encoder_too: bool = True,
) -> Path:
    """A random LoRA on the attention projections, in kohya's layout (`lora_unet_…`, `lora_te_…`).

    The same seed gives the same bytes; the models passed in are left as they were (the adapter goes on copies).
    """
    tensors = _kohya_lora("lora_unet", unet, UNET_LORA_TARGETS, rank, seed)
    if text_encoder_too:
        # kohya names the layers as CLIPTextModel did before transformers 5 dropped its `text_model` wrapper.
        wrapper = "" if hasattr(text_encoder, "text_model") else "text_model."
        tensors |= _kohya_lora("lora_te", text_encoder, TEXT_ENCODER_LORA_TARGETS, rank, seed + 1, wrapper)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.detach().to("cpu", torch.float32).contiguous() for key, tensor in tensors.items()},
              str(path))
    return path


def write_demo_lora(folder: Path, name: str = "demo") -> Path:
    """A LoRA for the built-in tiny model (SD_MODEL=tiny), as `folder`/`name`.safetensors."""
    from stable_diffusion.pipeline_initialization import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    return write_kohya_lora(pipe.unet, pipe.text_encoder, folder / f"{name}.safetensors", seed=1)


def _kohya_lora(
    kohya_prefix: str, model: torch.nn.Module, targets: list[str], rank: int, seed: int, wrapper: str = ""
) -> dict[str, torch.Tensor]:
    """A random peft LoRA on a copy of `model`, each layer's pair as kohya's `lora_down`/`lora_up`/`alpha`."""
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets)
    with seeded(seed):
        adapted = inject_adapter_in_model(config, copy.deepcopy(model))
    tensors = {}
    for key, tensor in get_peft_model_state_dict(adapted).items():
        module, pair = key.rsplit(".lora_", 1)
        name = f"{kohya_prefix}_{(wrapper + module).replace('.', '_')}"
        if pair == "A.weight":
            tensors[f"{name}.lora_down.weight"] = tensor
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
        else:
            tensors[f"{name}.lora_up.weight"] = tensor * LORA_STRENGTH
    return tensors


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random numbers from `seed` inside, and the caller's random state as it was afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
