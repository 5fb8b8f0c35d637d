"""Model loading: the tiny model through the same local-folder path real weights use, and its failures."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from service.local import model_config
from service.settings import Settings
from stable_diffusion.image_processing import fit_size, make_canny_edges
from stable_diffusion.pipeline_initialization import (
    FULL_SIZE_MODEL_DIR,
    ModelLoadError,
    load_pipelines,
    resolve_device,
    resolve_dtype,
    save_tiny_model,
)
from stable_diffusion.pipeline_runner import PipelineRunner
from stable_diffusion.recipe import GenerationRequest
from tests.conftest import tiny_environment
from tests.doubles import recording
from tests.images import drawing


def edge_request(**overrides) -> GenerationRequest:
    edges = make_canny_edges(drawing().resize(fit_size(160, 120, 64)), 100, 200)
    fields = {"request_id": "t", "control_images": (edges,), "prompt": "a lighthouse", "seed": 3, "steps": 4}
    return GenerationRequest(**(fields | overrides))


def test_tiny_model_saved_to_folders_loads_back_and_generates_the_same_pixels(tmp_path, pipeline_runner):
    sd_folder, controlnet_folder = save_tiny_model(tmp_path / "weights")
    assert (sd_folder / "model_index.json").is_file() and (controlnet_folder / "config.json").is_file()
    settings = Settings.load(
        env_file=None,
        environ=tiny_environment(tmp_path, SD_MODEL=str(sd_folder), CONTROLNET_MODEL=str(controlnet_folder)),
    )
    loaded = PipelineRunner(load_pipelines(model_config(settings)))
    assert loaded.model_name == f"{sd_folder} + {controlnet_folder}"
    built = pipeline_runner.run(edge_request()).images[0]
    reloaded = loaded.run(edge_request()).images[0]
    assert reloaded.tobytes() == built.tobytes()


def test_refiner_shares_the_weights(pipeline_runner):
    pipelines = pipeline_runner.pipelines
    assert pipelines.refine.unet is pipelines.generate.unet
    assert pipelines.refine.controlnet is pipelines.generate.controlnet


def test_refinement_changes_the_picture_and_zero_strength_skips_it(pipeline_runner):
    progress = []
    refined = pipeline_runner.run(edge_request(refine_strength=0.5), recording(progress))
    assert progress[-1] == (6, 6)  # 4 generation steps + 2 refinement steps
    plain = pipeline_runner.run(edge_request(refine_strength=0.0)).images[0]
    assert refined.images[0].tobytes() != plain.tobytes()


def test_steps_reach_the_pipeline(pipeline_runner):
    progress = []
    pipeline_runner.run(edge_request(steps=7, refine_strength=0.0), recording(progress))
    assert [done for done, _ in progress] == list(range(8))  # 0 when the run starts, then after each step


def test_the_edge_map_steers_the_picture(pipeline_runner):
    edges = edge_request().control_images[0]
    blank = edges.point(lambda _: 0)
    followed = pipeline_runner.run(edge_request()).images[0]
    unguided = pipeline_runner.run(edge_request(control_images=(blank,))).images[0]
    assert followed.tobytes() != unguided.tobytes()


def test_missing_folder_says_what_was_tried_and_what_to_set(tmp_path):
    settings = Settings.load(
        env_file=None, environ=tiny_environment(tmp_path, SD_MODEL=str(tmp_path / "nothing"),
                                                CONTROLNET_MODEL=str(tmp_path / "nothing-either"))
    )
    with pytest.raises(ModelLoadError) as raised:
        load_pipelines(model_config(settings))
    message = str(raised.value)
    assert message.startswith("Could not load SD_MODEL=") and "SD_MODEL=tiny" in message


def test_a_mistyped_model_name_names_its_own_setting(tmp_path):
    settings = Settings.load(env_file=None, environ=tiny_environment(tmp_path, SD_MODEL="tiny2"))
    with pytest.raises(ModelLoadError) as raised:
        load_pipelines(model_config(settings))
    # One line per setting at fault: SD_MODEL's own, and CONTROLNET_MODEL's where its Hub id cannot be fetched here.
    model_line, *others = str(raised.value).splitlines()
    assert model_line.startswith("Could not load SD_MODEL='tiny2'") and "tiny, sd15-random" in model_line
    assert "CONTROLNET_MODEL" not in model_line
    assert all(line.startswith("Could not load CONTROLNET_MODEL=") for line in others)


def test_folder_that_is_not_diffusers_format_is_named(tmp_path):
    _, controlnet_folder = save_tiny_model(tmp_path / "weights")
    empty = tmp_path / "empty"
    empty.mkdir()
    settings = Settings.load(
        env_file=None, environ=tiny_environment(tmp_path, SD_MODEL=str(empty), CONTROLNET_MODEL=str(controlnet_folder))
    )
    with pytest.raises(ModelLoadError, match="SD_MODEL=.*exists but is not a diffusers-format folder"):
        load_pipelines(model_config(settings))


def test_device_and_dtype_resolution_on_a_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="DEVICE=cuda"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="DTYPE=float16"):
        resolve_dtype("float16", torch.device("cpu"))


def test_the_full_size_random_model_has_sd15s_architecture():
    """SD_MODEL=sd15-random, for GPU benchmarks: the real sizes (built on the meta device: no memory)."""

    def config(name):
        return json.loads((FULL_SIZE_MODEL_DIR / f"{name}.json").read_text())

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**config("unet")),
            "controlnet": ControlNetModel(**config("controlnet")),
            "vae": AutoencoderKL(**config("vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**config("text_encoder"))),
        }
    millions = {name: round(sum(p.numel() for p in model.parameters()) / 1e6) for name, model in models.items()}
    assert millions == {"unet": 860, "controlnet": 361, "vae": 84, "text_encoder": 123}


def test_every_sampler_a_request_may_name_has_a_scheduler():
    from stable_diffusion.pipeline_runner import SCHEDULERS
    from stable_diffusion.recipe import SAMPLERS

    assert SCHEDULERS.keys() == SAMPLERS.keys()
