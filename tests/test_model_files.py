"""The model files the tests write load back through diffusers' own loaders into exactly the weights they came from."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import CLIPTextModel

from stable_diffusion.pipeline_initialization import TINY_MODEL_DIR, build_tiny_pipeline
from tests.model_files import write_controlnet_checkpoint, write_kohya_lora, write_sd_checkpoint

# Not a single letter: transformers 5 counts every parameter whose name contains the adapter's name as part of
# the adapter, and reports the text encoder's own weights as missing for names like "a" or "b".
ADAPTER = "toy_style"


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert expected_state.keys() == actual_state.keys()
    # A weight the file lacked would still be on the meta device, and torch.equal refuses it.
    assert [key for key, tensor in expected_state.items() if not torch.equal(tensor, actual_state[key])] == []


def test_sd_checkpoint_loads_back_into_the_same_unet_vae_and_text_encoder(tmp_path):
    pipe = build_tiny_pipeline()
    path = str(write_sd_checkpoint(pipe, tmp_path / "model.safetensors"))

    unet = UNet2DConditionModel.from_single_file(path, config=str(TINY_MODEL_DIR / "unet.json"))
    vae = AutoencoderKL.from_single_file(path, config=str(TINY_MODEL_DIR / "vae.json"))
    text_encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, load_file(path), config=str(TINY_MODEL_DIR / "text_encoder.json"), local_files_only=True
    )

    assert_same_weights(pipe.unet, unet)
    assert_same_weights(pipe.vae, vae)
    assert_same_weights(pipe.text_encoder, text_encoder)


def test_controlnet_checkpoint_loads_back_into_the_same_controlnet(tmp_path):
    controlnet = build_tiny_pipeline().controlnet
    path = write_controlnet_checkpoint(controlnet, tmp_path / "control_canny.safetensors")

    loaded = ControlNetModel.from_single_file(str(path), config=str(TINY_MODEL_DIR / "controlnet.json"))

    assert_same_weights(controlnet, loaded)


def test_kohya_lora_lands_unchanged_in_the_layers_it_names(tmp_path):
    pipe = build_tiny_pipeline()
    path = write_kohya_lora(pipe.unet, pipe.text_encoder, tmp_path / "lora.safetensors", rank=4)
    # Written from copies: the pipeline it came from has no adapter of its own.
    modules = (*pipe.unet.modules(), *pipe.text_encoder.modules())
    assert not any(isinstance(module, BaseTunerLayer) for module in modules)

    pipe.load_lora_weights(str(path), adapter_name=ADAPTER)

    written = load_file(path)
    # kohya names the text encoder's layers as they were inside CLIPTextModel's former `text_model` wrapper.
    adapted = {
        f"{prefix}_{(wrapper + name).replace('.', '_')}": module
        for prefix, wrapper, model in (("lora_unet", "", pipe.unet), ("lora_te", "text_model.", pipe.text_encoder))
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }
    assert {key.split(".")[0] for key in written} == adapted.keys()
    for name, module in adapted.items():
        assert torch.equal(module.lora_A[ADAPTER].weight, written[f"{name}.lora_down.weight"])
        assert torch.equal(module.lora_B[ADAPTER].weight, written[f"{name}.lora_up.weight"])
        assert module.scaling[ADAPTER] == written[f"{name}.alpha"].item() / 4
