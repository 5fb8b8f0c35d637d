"""What a newcomer tries the service with: the sample picture the README's examples send, the demo LoRA
command for the tiny model, and /info saying when the model has random weights."""

from __future__ import annotations

import io
import runpy

import numpy as np
import pytest
import requests
from PIL import Image

from service.settings import REPO_ROOT
from stable_diffusion import demo_lora
from stable_diffusion.config import ModelConfig
from stable_diffusion.image_processing import make_canny_edges
from stable_diffusion.lora_library import LoraLibrary
from stable_diffusion.pipeline_initialization import build_tiny_pipeline, load_pipelines
from stable_diffusion.pipeline_runner import PipelineRunner
from stable_diffusion.recipe import GenerationRequest
from tests.conftest import API_KEY
from tests.model_files import write_controlnet_checkpoint, write_sd_checkpoint

SAMPLE = REPO_ROOT / "examples" / "lighthouse.png"
HEADERS = {"x-api-key": API_KEY}


def test_the_sample_picture_is_the_one_the_script_draws_small_and_served(live_server):
    drawn = runpy.run_path(str(REPO_ROOT / "scripts" / "make_sample_picture.py"))["sample_bytes"]()
    with Image.open(SAMPLE) as shipped, Image.open(io.BytesIO(drawn)) as made:
        assert shipped.format == "PNG" and np.array_equal(np.asarray(shipped), np.asarray(made))
    assert SAMPLE.stat().st_size < 8 * 1024

    with SAMPLE.open("rb") as picture:
        answer = requests.post(
            f"{live_server.url}/generate", headers=HEADERS, files={"image": picture},
            data={"prompt": "a watercolor painting of a lighthouse"}, verify=live_server.cert, timeout=120,
        )
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/png"


def test_the_demo_lora_command_writes_a_lora_the_tiny_model_paints_with(tmp_path, capsys):
    """The command's own main (python -m runs it; test_documented_commands.py runs its --help that way)."""
    loras = tmp_path / "lora"
    demo_lora.main([str(loras)])
    assert "loras=demo:1" in capsys.readouterr().out

    generator = PipelineRunner(load_pipelines(ModelConfig("tiny", "tiny", device="cpu", lora_dir=loras)))
    # Listed by /models as a LoRA for the tiny model's family.
    assert [lora.name for lora in LoraLibrary(loras).describe(generator.describe()["family"])] == ["demo"]
    edges = make_canny_edges(Image.open(SAMPLE).convert("RGB").resize((64, 48)), 100, 200)
    plain, with_lora = (
        np.asarray(generator.run(GenerationRequest("demo", (edges,), "a lighthouse", steps=4, loras=loras_used))
                   .images[0], dtype=np.float32)
        for loras_used in ((), (("demo", 1.0),))
    )
    assert np.abs(with_lora - plain).mean() > 1


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("random-weights")
    pipe = build_tiny_pipeline()
    return (write_sd_checkpoint(pipe, folder / "model.safetensors"),
            write_controlnet_checkpoint(pipe.controlnet, folder / "canny.safetensors"))


def test_info_says_random_weights_for_the_built_in_model_only(model_files):
    model, controlnet = model_files
    built_in = PipelineRunner(load_pipelines(ModelConfig("tiny", "tiny", device="cpu")))
    from_files = PipelineRunner(load_pipelines(ModelConfig(str(model), str(controlnet), device="cpu")))

    assert built_in.describe()["random_weights"] is True
    assert from_files.describe()["random_weights"] is False
