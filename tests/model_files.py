"""Writes model files in the layouts AUTOMATIC1111 and ComfyUI users keep them in, from diffusers models.

A checkpoint is one `.safetensors` file in the original (CompVis/LDM) layout; a ControlNet is in lllyasviel's
layout; a LoRA is in kohya's (written by stable_diffusion/kohya_lora.py). The renaming is worked out from each
model's config (how many blocks, how many layers in each, which blocks attend), so it serves the tiny model and
the full-size SD 1.5 alike.
"""

from __future__ import annotations

import json
from collections.abc import Container, Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

# The LoRA writer is the product's own (the demo LoRA command uses it); the tests use the same one.
from stable_diffusion.kohya_lora import seeded, write_kohya_lora
from stable_diffusion.pipeline_initialization import TINY_MODEL_DIR

__all__ = ["write_controlnet_checkpoint", "write_kohya_lora", "write_sd_checkpoint", "write_wrong_architecture_lora"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
CONTROLNET_PREFIX = "control_model."

# A module's place in the original layout, and how the layers inside it are named there.
Place = tuple[str, dict[str, str]]

UNET_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_LAYERS = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_LAYERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
SAME_LAYERS: dict[str, str] = {}


def write_sd_checkpoint(pipe: DiffusionPipeline, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The pipeline's UNet, VAE and text encoder as one original-layout checkpoint, as A1111 users keep it."""
    unet = pipe.unet
    tensors = {
        **_renamed(unet.state_dict(), unet_places(unet.config), UNET_PREFIX),
        **_vae_tensors(pipe.vae),
        **_text_encoder_tensors(pipe.text_encoder),
    }
    return _save(tensors, path, dtype)


def write_controlnet_checkpoint(controlnet: ControlNetModel, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A ControlNet in lllyasviel's layout, under the `control_model.` prefix diffusers strips on loading."""
    tensors = _renamed(controlnet.state_dict(), controlnet_places(controlnet.config), CONTROLNET_PREFIX)
    return _save(tensors, path, dtype)


def write_wrong_architecture_lora(path: Path) -> Path:
    """A kohya LoRA with the tiny model's layer names but twice its widths, so no layer's shape fits."""
    unet_config = json.loads((TINY_MODEL_DIR / "unet.json").read_text())
    text_config = json.loads((TINY_MODEL_DIR / "text_encoder.json").read_text())
    unet_config["block_out_channels"] = [2 * width for width in unet_config["block_out_channels"]]
    unet_config["cross_attention_dim"] *= 2
    text_config["hidden_size"] *= 2
    with seeded(0):
        unet = UNet2DConditionModel(**unet_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    return write_kohya_lora(unet, text_encoder, path)


def unet_places(config: Mapping) -> dict[str, Place]:
    """Where each UNet module sits in the original layout: `input_blocks` down, `middle_block`, `output_blocks` up."""
    places = _encoder_places(config)
    places["conv_norm_out"] = ("out.0", SAME_LAYERS)
    places["conv_out"] = ("out.2", SAME_LAYERS)
    levels = len(config["up_block_types"])
    index = 0
    for level, block_type in enumerate(config["up_block_types"]):
        attends = "CrossAttn" in block_type
        # On the way up each level has one layer more than on the way down: it also takes the skip from below.
        for layer in range(config["layers_per_block"] + 1):
            places[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{index}.0", UNET_RESNET_LAYERS)
            if attends:
                places[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{index}.1", SAME_LAYERS)
            index += 1
        if level < levels - 1:
            # The upsampler is the last part of the level's last output block, after its attention if any.
            upsampler = f"output_blocks.{index - 1}.{2 if attends else 1}.conv"
            places[f"up_blocks.{level}.upsamplers.0.conv"] = (upsampler, SAME_LAYERS)
    return places


def controlnet_places(config: Mapping) -> dict[str, Place]:
    """The ControlNet is the UNet's encoder plus the edge-map encoder and one zero convolution per input block."""
    places = _encoder_places(config)
    # input_hint_block is a Sequential of convolutions with a SiLU between each two: convolutions sit at even indexes.
    hint_convolutions = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    places["controlnet_cond_embedding.conv_in"] = ("input_hint_block.0", SAME_LAYERS)
    for block in range(hint_convolutions):
        places[f"controlnet_cond_embedding.blocks.{block}"] = (f"input_hint_block.{2 * (block + 1)}", SAME_LAYERS)
    places["controlnet_cond_embedding.conv_out"] = (f"input_hint_block.{2 * (hint_convolutions + 1)}", SAME_LAYERS)
    for block in range(_input_block_count(config)):
        places[f"controlnet_down_blocks.{block}"] = (f"zero_convs.{block}.0", SAME_LAYERS)
    places["controlnet_mid_block"] = ("middle_block_out.0", SAME_LAYERS)
    return places


def vae_places(config: Mapping) -> dict[str, Place]:
    """Where each VAE module sits in the original layout; the decoder's levels are numbered from the bottom."""
    places = {
        "quant_conv": ("quant_conv", SAME_LAYERS),
        "post_quant_conv": ("post_quant_conv", SAME_LAYERS),
    }
    levels = len(config["block_out_channels"])
    for coder, way, resampler, original_resampler, resnets_per_level in (
        ("encoder", "down", "downsamplers.0.conv", "downsample.conv", config["layers_per_block"]),
        ("decoder", "up", "upsamplers.0.conv", "upsample.conv", config["layers_per_block"] + 1),
    ):
        places[f"{coder}.conv_in"] = (f"{coder}.conv_in", SAME_LAYERS)
        places[f"{coder}.conv_norm_out"] = (f"{coder}.norm_out", SAME_LAYERS)
        places[f"{coder}.conv_out"] = (f"{coder}.conv_out", SAME_LAYERS)
        places[f"{coder}.mid_block.resnets.0"] = (f"{coder}.mid.block_1", VAE_RESNET_LAYERS)
        places[f"{coder}.mid_block.attentions.0"] = (f"{coder}.mid.attn_1", VAE_ATTENTION_LAYERS)
        places[f"{coder}.mid_block.resnets.1"] = (f"{coder}.mid.block_2", VAE_RESNET_LAYERS)
        for level in range(levels):
            block = f"{coder}.{way}_blocks.{level}"
            original = f"{coder}.{way}.{level if coder == 'encoder' else levels - 1 - level}"
            for layer in range(resnets_per_level):
                places[f"{block}.resnets.{layer}"] = (f"{original}.block.{layer}", VAE_RESNET_LAYERS)
            if level < levels - 1:
                places[f"{block}.{resampler}"] = (f"{original}.{original_resampler}", SAME_LAYERS)
    return places


def _encoder_places(config: Mapping) -> dict[str, Place]:
    """The part the UNet and the ControlNet share: time embedding, `input_blocks` and `middle_block`."""
    places = {
        "time_embedding.linear_1": ("time_embed.0", SAME_LAYERS),
        "time_embedding.linear_2": ("time_embed.2", SAME_LAYERS),
        "conv_in": ("input_blocks.0.0", SAME_LAYERS),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET_LAYERS),
        "mid_block.attentions.0": ("middle_block.1", SAME_LAYERS),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET_LAYERS),
    }
    levels = len(config["down_block_types"])
    index = 1
    for level, block_type in enumerate(config["down_block_types"]):
        for layer in range(config["layers_per_block"]):
            places[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{index}.0", UNET_RESNET_LAYERS)
            if "CrossAttn" in block_type:
                places[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{index}.1", SAME_LAYERS)
            index += 1
        if level < levels - 1:
            # Every level but the lowest ends in an input block of its own that only downsamples.
            places[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", SAME_LAYERS)
            index += 1
    return places


def _input_block_count(config: Mapping) -> int:
    """conv_in, `layers_per_block` blocks on each level, and a downsampler after each level but the lowest."""
    levels = len(config["down_block_types"])
    return 1 + levels * config["layers_per_block"] + levels - 1


def _renamed(
    state_dict: Mapping[str, torch.Tensor], places: Mapping[str, Place], prefix: str
) -> dict[str, torch.Tensor]:
    """`state_dict` under its original names; a key in no known module is a KeyError, never silently left out."""
    renamed = {}
    for key, tensor in state_dict.items():
        module = _known_head(key, places)
        if module is None:
            raise KeyError(f"{key} belongs to no module this layout knows")
        original, layer_names = places[module]
        inside = key.removeprefix(f"{module}.")
        layer = _known_head(inside, layer_names)
        if layer is not None:
            inside = layer_names[layer] + inside.removeprefix(layer)
        renamed[f"{prefix}{original}.{inside}"] = tensor
    return renamed


def _known_head(key: str, names: Container[str]) -> str | None:
    """The longest leading part of `key`, in whole dotted names and short of the last one, that is in `names`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in names:
            return head
    return None


def _vae_tensors(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE's tensors; its attention projections are 1x1 convolutions in the original, not linear layers."""
    tensors = _renamed(vae.state_dict(), vae_places(vae.config), VAE_PREFIX)
    return {
        key: tensor[:, :, None, None] if ".attn_1." in key and tensor.ndim == 2 else tensor
        for key, tensor in tensors.items()
    }


def _text_encoder_tensors(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The CLIP text encoder under its transformers names, with the `text_model.` level checkpoints keep."""
    wrapper = "" if hasattr(text_encoder, "text_model") else "text_model."
    return {f"{TEXT_ENCODER_PREFIX}{wrapper}{key}": tensor for key, tensor in text_encoder.state_dict().items()}


def _save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> Path:
    """Floating-point tensors in `dtype`, as one safetensors file; a model built on the meta device (shapes, no
    values) as a file of zeros."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(tensor.is_meta for tensor in tensors.values()):
        return _save_zeros(tensors, path, dtype)
    save_file(
        {
            key: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
            for key, tensor in tensors.items()
        },
        str(path),
    )
    return path


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def _save_zeros(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> Path:
    """The safetensors layout (the header's length, the JSON header, then each tensor's bytes) with every byte
    of the tensors zero, left to the file system as a hole: a full-size checkpoint is written at once, and read
    back without waiting for a disk."""
    header, offset = {}, 0
    for key, tensor in tensors.items():
        kind = dtype if tensor.is_floating_point() else tensor.dtype
        size = tensor.numel() * kind.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[kind], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded)
        file.truncate(8 + len(encoded) + offset)
    return path
