"""Speed settings (fused attention, channels-last memory, torch.compile) change how fast a picture is
made, never which picture."""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import requests
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from service.local import model_config
from stable_diffusion.pipeline_initialization import load_pipelines
from stable_diffusion.pipeline_runner import PipelineRunner
from tests.conftest import API_KEY, LiveServer, tiny_settings
from tests.images import png_bytes
from tests.test_batching import assert_same_picture
from tests.test_models import edge_request

KEY = {"x-api-key": API_KEY}


def test_every_attention_layer_uses_pytorchs_fused_attention(pipeline_runner):
    pipe = pipeline_runner.pipelines.generate
    for model in (pipe.unet, pipe.controlnet, pipe.vae):
        assert model.attn_processors
        assert all(isinstance(processor, AttnProcessor2_0) for processor in model.attn_processors.values())
    assert pipeline_runner.describe()["attention"] == "sdpa"


def test_channels_last_is_off_on_the_cpu_unless_asked_and_gives_the_same_picture(tmp_path, pipeline_runner):
    assert pipeline_runner.describe()["channels_last"] is False
    settings = tiny_settings(tmp_path, CHANNELS_LAST="on")
    channels_last = PipelineRunner(load_pipelines(model_config(settings)))
    assert channels_last.describe()["channels_last"] is True
    weight = channels_last.pipelines.generate.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    request = edge_request(seed=11)
    assert_same_picture(channels_last.run(request).images[0], pipeline_runner.run(request).images[0])


def test_without_compile_or_gpu_there_is_no_warm_up(pipeline_runner):
    pipeline_runner.warm_up()
    assert pipeline_runner.describe()["warm_up_seconds"] is None
    assert pipeline_runner.describe()["warm_up_sizes"] == []


def test_a_lora_batch_runs_the_unet_uncompiled_and_the_next_plain_batch_compiled_again(
    tmp_path, monkeypatch, lora_server
):
    """What TORCH_COMPILE runs, seen without compiling: torch.compile is a stand-in that counts the calls of
    each model's compiled forward (the live server's test below shows that a request compiles nothing)."""
    calls: Counter[str] = Counter()

    def counting_compile(forward, **options):
        def compiled(*args, **kwargs):
            calls[type(forward.__self__).__name__] += 1
            return forward(*args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", counting_compile)
    settings = tiny_settings(tmp_path, TORCH_COMPILE="default", LORA_DIR=lora_server.environment["LORA_DIR"])
    generator = PipelineRunner(load_pipelines(model_config(settings)))

    def compiled_unet_calls(request) -> int:
        before = calls["UNet2DConditionModel"]
        generator.run(request)
        return calls["UNet2DConditionModel"] - before

    plain = edge_request(seed=5, steps=2)
    assert compiled_unet_calls(plain) > 0
    assert compiled_unet_calls(replace(plain, loras=(("ink", 1.0),))) == 0
    assert compiled_unet_calls(plain) > 0
    assert calls["ControlNetModel"] > 0


def generate(server, seed: int, picture: bytes | None = None, **fields: str) -> requests.Response:
    return requests.post(
        f"{server.url}/generate", headers=KEY, files={"image": ("p.png", picture or png_bytes())},
        data={"prompt": "a lighthouse", "seed": str(seed), **fields}, verify=server.cert, timeout=300,
    )


def wait_until_ready(server, timeout: float) -> set[str]:
    """Poll /ready until it answers 200; the states it went through."""
    states, deadline = set(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.output()
        try:
            # The server writes its certificate as it starts.
            response = requests.get(f"{server.url}/ready", headers=KEY, verify=False, timeout=10)
        except requests.ConnectionError:
            time.sleep(0.5)
            continue
        states.add(response.json()["status"])
        if response.ok:
            return states
        assert response.status_code == 503 and response.headers["Retry-After"]
        time.sleep(0.5)
    pytest.fail(f"not ready after {timeout} s: {states}\n{server.output()}")


def test_a_compiled_server_warms_up_before_ready_and_never_compiles_for_a_request(tmp_path, live_server, lora_server):
    # The smallest compile that proves it: one warm-up size, 64x48 (not the 64x64 square of the tests'
    # default resolution, so that serving it without compiling shows WARM_UP_SIZES was read), and batches of
    # up to 4: the warm-up runs 1, 2 and 4 pictures, the test sends a batch of 3, a batch size it did not run.
    server = LiveServer(tmp_path, TORCH_COMPILE="default", BATCH_SIZE="4", BATCH_WAIT_MS="2000",
                        WARM_UP_SIZES="64x48", TORCH_LOGS="dynamo,recompiles",
                        LORA_DIR=lora_server.environment["LORA_DIR"])
    try:
        assert "warming_up" in wait_until_ready(server, timeout=900)
        info = requests.get(f"{server.url}/info", headers=KEY, verify=server.cert, timeout=10).json()
        assert info["torch_compile"] == "default" and info["attention"] == "sdpa" and info["warm_up_seconds"] > 0
        assert info["warm_up_sizes"] == ["64x48"]
        warmed_up = re.compile(r"warm-up took [\d.]+ s \(torch.compile: default; 64x48, batches of 1 and 2 and 4\)")
        warm_up_line = warmed_up.search(server.output())
        assert warm_up_line, server.output()[-3000:]
        start_up = server.output()[: warm_up_line.end()]
        # dynamo says when it compiles: the UNet and the ControlNet once each, one graph for both passes and
        # any batch.
        assert start_up.count("torchdynamo start tracing") == 2, start_up[-3000:]

        # Three at once share one run (so they report the same run time): each is the picture the uncompiled
        # server paints, and none of them made torch compile anything.
        four_by_three = png_bytes(120, 90)  # 64x48 at the tests' resolution of 64
        with ThreadPoolExecutor(3) as pool:
            compiled = list(pool.map(lambda seed: generate(server, seed, four_by_three), (21, 22, 23)))
        for seed, fast in zip((21, 22, 23), compiled, strict=True):
            assert fast.status_code == 200, fast.text
            assert Image.open(io.BytesIO(fast.content)).size == (64, 48)
            slow = generate(live_server, seed, four_by_three)
            assert_same_picture(Image.open(io.BytesIO(fast.content)), Image.open(io.BytesIO(slow.content)))
        run_seconds = re.findall(r"generation_s=([\d.]+)", (tmp_path / "api.log").read_text())
        assert len(run_seconds) == 3 and len(set(run_seconds)) == 1, run_seconds

        # LoRAs: their batches run the UNet uncompiled (a new adapter, set or weight would compile it again),
        # painting what an uncompiled server paints; the next batch without one finds the UNet's layers as it was
        # compiled with them (nothing recompiles) and paints what it painted before. (That it runs compiled
        # again is the test above.)
        for loras in ("ink:1", "ink:0.5,paper:1"):
            with_lora = generate(server, 25, four_by_three, loras=loras)
            reference = generate(lora_server, 25, four_by_three, loras=loras)
            assert_same_picture(Image.open(io.BytesIO(with_lora.content)), Image.open(io.BytesIO(reference.content)))
        plain_again = generate(server, 21, four_by_three)
        assert_same_picture(Image.open(io.BytesIO(plain_again.content)), Image.open(io.BytesIO(compiled[0].content)))
        after_warm_up = server.output()[len(start_up):]
        assert "torchdynamo start tracing" not in after_warm_up, after_warm_up[-3000:]
    finally:
        server.stop()
