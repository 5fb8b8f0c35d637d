"""Generation controls, the progress GIF, the edge-map preview and GET /info."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from stable_diffusion.pipeline_runner import SCHEDULERS
from tests.conftest import API_KEY
from tests.images import animated_gif_bytes, drawing, encode, png_bytes
from tests.test_generate_api import assert_error, post_generate

KEY = {"x-api-key": API_KEY}


def pixels(response) -> bytes:
    assert response.status_code == 200, response.get_data(as_text=True)
    return Image.open(io.BytesIO(response.data)).convert("RGB").tobytes()


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", "6"), ("guidance_scale", "1.5"), ("scheduler", "euler_a"), ("scheduler", "ddim"),
     ("control_start", "0.5"), ("control_end", "0.5"), ("refine_strength", "0"), ("negative_prompt", "dark")],
)
def test_each_control_changes_the_picture(client, field, value):
    baseline = pixels(post_generate(client, png_bytes(), seed="3", refine_strength="0.5"))
    fields = {"seed": "3", "refine_strength": "0.5", field: value}
    assert pixels(post_generate(client, png_bytes(), **fields)) != baseline


def test_canny_thresholds_change_the_picture(client):
    soft = encode(drawing().point(lambda value: 90 + value // 5))
    default = pixels(post_generate(client, soft, seed="3", resolution="256"))
    changed = post_generate(client, soft, seed="3", resolution="256", low_threshold="5", high_threshold="10")
    assert pixels(changed) != default


def test_controls_are_recorded_in_the_recipe(client):
    fields = {"seed": "9", "steps": "5", "guidance_scale": "4", "scheduler": "dpmpp_2m", "control_start": "0.1",
              "control_end": "0.9", "refine_strength": "0.4", "low_threshold": "50", "high_threshold": "150"}
    image = Image.open(io.BytesIO(post_generate(client, png_bytes(), **fields).data))
    recipe = json.loads(image.text["recipe"])
    assert recipe["steps"] == 5 and recipe["scheduler"] == "dpmpp_2m" and recipe["low_threshold"] == 50
    assert "Steps: 5, Sampler: DPM++ 2M, CFG scale: 4.0, Seed: 9, Size: 64x48" in image.text["parameters"]


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_generates(client, scheduler):
    assert post_generate(client, png_bytes(), scheduler=scheduler).status_code == 200


def test_resolution_sets_the_longer_side(client):
    assert Image.open(io.BytesIO(post_generate(client, png_bytes(120, 160), resolution="256").data)).size == (192, 256)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"guidance_scale": "31"}, ["guidance_scale", "0 to 30"]),
        ({"steps": "101"}, ["steps", "1 to 100"]),
        ({"steps": "2.5"}, ["steps", "integer"]),
        ({"resolution": "2048"}, ["resolution", "to 1024"]),
        ({"resolution": "40"}, ["resolution", "greater than or equal to 64"]),
        ({"low_threshold": "300"}, ["low_threshold", "0 to 255"]),
        ({"control_start": "1.5"}, ["control_start", "0 to 1"]),
        ({"control_start": "0.6", "control_end": "0.4"}, ["control_start (0.6) must be below control_end (0.4)"]),
        ({"refine_strength": "-0.1"}, ["refine_strength", "0 to 1"]),
        ({"seed": "4294967296"}, ["seed"]),
        ({"progress_gif": "maybe"}, ["progress_gif", "true or false"]),
    ],
)
def test_bad_control_values_are_400_naming_field_and_range(client, fields, words):
    assert_error(post_generate(client, png_bytes(), **fields), 400, *words)


def test_progress_gif_shows_every_step_ending_on_the_result(client):
    response = post_generate(client, png_bytes(), steps="5", refine_strength="0.4", progress_gif="true")
    assert response.status_code == 200 and response.mimetype == "image/gif"
    assert response.headers["Content-Disposition"].endswith(".gif")
    gif = Image.open(io.BytesIO(response.data))
    assert gif.n_frames == 5 + 2  # generation steps, refinement steps; the last one is the final picture


def test_a_one_step_progress_gif_is_the_final_picture(client):
    response = post_generate(client, png_bytes(), steps="1", refine_strength="0", progress_gif="true")
    assert response.status_code == 200 and response.mimetype == "image/gif", response.get_data(as_text=True)
    assert Image.open(io.BytesIO(response.data)).n_frames == 1


def test_progress_gif_is_for_still_images(client):
    assert_error(post_generate(client, animated_gif_bytes([50, 50]), progress_gif="true"), 400, "still images")


def post_preprocess(client, upload: bytes, **fields):
    data = {"image": (io.BytesIO(upload), "p.png"), **fields}
    return client.post("/preprocess", headers=KEY, data=data, content_type="multipart/form-data")


def test_preprocess_returns_the_black_and_white_edge_map(client, settings):
    response = post_preprocess(client, png_bytes(160, 120), resolution="256")
    assert response.status_code == 200 and response.mimetype == "image/png"
    edges = np.asarray(Image.open(io.BytesIO(response.data)).convert("RGB"))
    assert edges.shape == (192, 256, 3) and set(np.unique(edges)) == {0, 255}
    assert list(settings.output_dir.iterdir()) == []


def test_preprocess_thresholds_change_the_edge_map(client):
    soft = encode(drawing(200, 150).point(lambda value: 90 + value // 5))
    low, high = (
        np.asarray(Image.open(io.BytesIO(post_preprocess(client, soft, low_threshold=a, high_threshold=b).data)))
        for a, b in (("5", "10"), ("240", "250"))
    )
    assert low.sum() > high.sum()


def test_preprocess_checks_key_image_and_fields(client):
    assert client.post("/preprocess").status_code == 401
    assert_error(post_preprocess(client, b"GIF89a-broken"), 415)
    assert_error(post_preprocess(client, png_bytes(), prompt="x"), 400, "prompt is not a field")


def test_info_reports_model_device_schedulers_defaults_and_limits(client, settings):
    info = client.get("/info", headers=KEY).get_json()
    assert info["model"] == "tiny" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["schedulers"] == list(SCHEDULERS)
    generate = info["fields"]["generate"]
    assert generate["steps"]["default"] == settings.default_steps and generate["steps"]["maximum"] == settings.max_steps
    assert generate["sensitivity"] == generate["sensitivity"] | {"default": 1.0, "minimum": 0.0, "maximum": 2.0}
    assert generate["resolution"]["maximum"] == settings.max_resolution
    assert set(info["fields"]["preprocess"]) == {"resolution", "low_threshold", "high_threshold"}
    assert info["limits"]["max_gif_frames"] == settings.max_gif_frames
    assert client.get("/info").status_code == 401
