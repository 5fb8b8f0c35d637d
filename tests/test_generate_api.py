"""POST /generate through the Flask app with the real worker and the tiny model."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import struct
import zlib

import pytest
import torch
from PIL import Image
from werkzeug.datastructures import MultiDict

from app import create_app
from service.fields import generate_fields_model
from service.local import LocalGenerationService
from service.settings import REPO_ROOT
from stable_diffusion.pipeline_runner import PipelineRunner
from tests.conftest import API_KEY, SECOND_KEY, serving, tiny_settings
from tests.figures import record
from tests.images import animated_gif_bytes, drawing, encode, png_bytes

KEY = {"x-api-key": API_KEY}


def post_generate(client, upload: bytes | None = None, headers=KEY, **fields):
    data = {"prompt": "a house by a lake", **fields}
    if upload is not None:
        data["image"] = (io.BytesIO(upload), "upload.png")
    return client.post("/generate", headers=headers, data=data, content_type="multipart/form-data")


def files_in(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    message = response.get_json()["error"]
    for word in words:
        assert word in message


def test_generate_returns_a_png_of_the_requested_size_and_saves_it(client, settings):
    response = post_generate(client, png_bytes(160, 120), resolution="256", seed="7")

    assert response.status_code == 200
    assert response.mimetype == "image/png"
    image = Image.open(io.BytesIO(response.data))
    assert image.format == "PNG" and image.size == (256, 192)
    assert response.headers["X-Seed"] == "7"
    assert response.headers["X-Worker"] == f"{socket.gethostname()}:{os.getpid()}", "this process ran the model"
    assert len(response.headers["X-Request-ID"]) >= 16
    saved_name = response.headers["Content-Disposition"].split("filename=")[1]
    assert saved_name.endswith(".png")
    assert (settings.output_dir / saved_name).read_bytes() == response.data
    [upload] = files_in(settings.input_dir)
    assert upload == saved_name
    assert (settings.input_dir / upload).read_bytes() == png_bytes(160, 120)


def test_output_names_are_timestamped_and_unique(client, settings):
    names = {post_generate(client, png_bytes()).headers["Content-Disposition"] for _ in range(3)}
    assert len(names) == 3
    for name in files_in(settings.output_dir):
        assert len(name.split("_")[0]) == 8 and name.split("_")[0].isdigit()
    assert not [name for name in files_in(settings.output_dir) if name.endswith(".tmp")]


def test_jpeg_upload_is_kept_as_jpg_and_answered_with_png(client, settings):
    response = post_generate(client, encode(drawing(), "JPEG"))
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert files_in(settings.input_dir)[0].endswith(".jpg")


def test_exif_rotated_jpeg_is_generated_upright(client):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees
    response = post_generate(client, encode(drawing(160, 96), "JPEG", exif=exif), resolution="256")
    assert Image.open(io.BytesIO(response.data)).size == (152, 256)


def test_png_carries_its_recipe(client):
    response = post_generate(client, png_bytes(), seed="42", negative_prompt="blurry", sensitivity="0.5")
    image = Image.open(io.BytesIO(response.data))
    lines = image.text["parameters"].splitlines()
    assert lines[0] == "a house by a lake"
    assert lines[1] == "Negative prompt: blurry"
    assert "Seed: 42" in lines[2] and "Control weight: 0.5" in lines[2] and "ControlNet: canny" in lines[2]
    recipe = json.loads(image.text["recipe"])
    assert recipe["seed"] == 42 and recipe["sensitivity"] == 0.5 and recipe["model"] == "tiny"


def test_same_seed_gives_the_same_pixels_and_another_seed_another_picture(client):
    first, again, other = (post_generate(client, png_bytes(), seed=seed) for seed in ("5", "5", "6"))
    pixels = [Image.open(io.BytesIO(r.data)).tobytes() for r in (first, again, other)]
    assert pixels[0] == pixels[1]
    assert pixels[0] != pixels[2]


def test_without_a_seed_a_random_one_is_returned_and_reproduces_the_image(client):
    first = post_generate(client, png_bytes())
    seed = first.headers["X-Seed"]
    assert 0 <= int(seed) < 2**32
    again = post_generate(client, png_bytes(), seed=seed)
    assert Image.open(io.BytesIO(first.data)).tobytes() == Image.open(io.BytesIO(again.data)).tobytes()


def test_sensitivity_changes_the_picture(client):
    weak, strong = (post_generate(client, png_bytes(), seed="1", sensitivity=s) for s in ("0", "2"))
    assert Image.open(io.BytesIO(weak.data)).tobytes() != Image.open(io.BytesIO(strong.data)).tobytes()


def test_animated_gif_comes_back_animated_with_its_timing(client):
    response = post_generate(client, animated_gif_bytes([80, 160, 240, 320], loop=0))
    assert response.status_code == 200 and response.mimetype == "image/gif"
    image = Image.open(io.BytesIO(response.data))
    durations = []
    for index in range(image.n_frames):
        image.seek(index)
        durations.append(image.info["duration"])
    assert durations == [80, 160, 240, 320]
    assert image.info["loop"] == 0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({}, "Missing API key"), ({"x-api-key": "wrong"}, "Invalid API key"), ({"x-api-key": ""}, "Invalid API key"),
     ({"x-api-key": "k" * 10_000}, "Invalid API key")],
)
def test_generate_without_a_valid_key_is_401(client, settings, headers, expected):
    assert_error(post_generate(client, png_bytes(), headers=headers), 401, expected)
    assert files_in(settings.input_dir) == [] and files_in(settings.output_dir) == []


def test_non_ascii_key_is_401_not_500(client):
    environ = {"HTTP_X_API_KEY": "cl\u00e9-\u00fc"}
    response = client.post("/generate", environ_base=environ, data={})
    assert_error(response, 401, "Invalid API key")


def test_every_configured_key_is_accepted(client):
    assert post_generate(client, png_bytes(), headers={"x-api-key": SECOND_KEY}).status_code == 200


def test_health_needs_no_key_and_unknown_routes_do(client):
    assert client.get("/health").get_json() == {"status": "ok"}
    assert client.get("/nowhere").status_code == 401
    assert_error(client.get("/nowhere", headers=KEY), 404)


def test_get_on_generate_is_405_json(client):
    assert_error(client.get("/generate", headers=KEY), 405)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt": ""}, ["prompt", "required", "1 to 1000"]),
        ({"prompt": "   "}, ["prompt", "at least 1 character"]),
        ({"prompt": "x" * 1001}, ["prompt", "at most 1000"]),
        ({"sensitivity": "strong"}, ["sensitivity", "'strong'", "0 to 2"]),
        ({"sensitivity": "2.5"}, ["sensitivity", "less than or equal to 2"]),
        ({"sensitivity": "nan"}, ["sensitivity", "finite"]),
        ({"sensitivity": "inf"}, ["sensitivity", "finite"]),
        ({"seed": "-1"}, ["seed", "0 to 4294967295"]),
        ({"steps": "0"}, ["steps"]),
        ({"resolution": "300"}, ["resolution", "multiple of 8"]),
        ({"low_threshold": "200", "high_threshold": "100"}, ["low_threshold (200) must be below high_threshold"]),
        ({"scheduler": "plms"}, ["scheduler", "unipc"]),
        ({"strenght": "1"}, ["strenght is not a field"]),
    ],
)
def test_invalid_fields_are_400_naming_the_field(client, settings, fields, words):
    if fields.get("prompt") == "":
        response = client.post("/generate", headers=KEY, data={"image": (io.BytesIO(png_bytes()), "a.png")})
    else:
        response = post_generate(client, png_bytes(), **fields)
    assert_error(response, 400, *words)
    assert files_in(settings.input_dir) == [] and files_in(settings.output_dir) == []


def test_missing_image_is_400_with_the_curl_fix(client):
    assert_error(post_generate(client), 400, "image is required", "curl -F image=@")


def test_image_sent_as_text_is_400(client):
    assert_error(post_generate(client, None, image="not a file"), 400, "image must be a file upload")


def test_repeated_field_is_400(client):
    data = [("prompt", "one"), ("prompt", "two"), ("image", (io.BytesIO(png_bytes()), "a.png"))]
    response = client.post("/generate", headers=KEY, data=MultiDict(data), content_type="multipart/form-data")
    assert_error(response, 400, "prompt was sent 2 times")


def test_json_body_is_400_saying_multipart(client):
    response = client.post("/generate", headers=KEY, json={"prompt": "x"})
    assert_error(response, 400, "multipart/form-data")


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        (b"", 400, ["empty"]),
        (b"<html><body>hello</body></html>", 415, ["not a PNG, JPEG or GIF"]),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, ["not a PNG, JPEG or GIF"]),
        (encode(drawing(), "BMP"), 415, ["not a PNG, JPEG or GIF"]),
        (encode(drawing(), "WEBP"), 415, ["not a PNG, JPEG or GIF"]),
        (png_bytes()[:200], 415, ["truncated or corrupt"]),
        (encode(drawing(), "JPEG")[:300], 415, ["truncated or corrupt"]),
    ],
)
def test_bad_image_files_are_4xx_and_leave_nothing_on_disk(client, settings, payload, status, words):
    assert_error(post_generate(client, payload), status, *words)
    assert files_in(settings.input_dir) == [] and files_in(settings.output_dir) == []


def test_decompression_bomb_is_rejected_before_decoding(client):
    # A valid PNG header claiming 100000 x 100000 pixels, with almost no data behind it.
    header = encode(Image.new("L", (1, 1)))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    bomb = header[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + header[33:]
    assert_error(post_generate(client, bomb), 400, "over the limit", "MAX_IMAGE_PIXELS")


def test_gif_over_the_frame_limit_is_400(client, settings):
    too_many = animated_gif_bytes([50] * (settings.max_gif_frames + 1), size=(16, 16))
    assert_error(post_generate(client, too_many), 400, f"more than {settings.max_gif_frames} frames")


def test_upload_over_the_size_limit_is_413(tmp_path, worker):
    small = tiny_settings(tmp_path, MAX_UPLOAD_MB="0.01")
    client = create_app(small, LocalGenerationService(small, worker)).test_client()
    assert_error(post_generate(client, png_bytes() + b"\0" * 20_000), 413, "0.01 MB", "MAX_UPLOAD_MB")
    assert_error(post_generate(client, b"\0" * 400_000), 413, "0.01 MB", "MAX_UPLOAD_MB")


class FailingOnce(PipelineRunner):
    """The GPU edge, faulted: the first run raises `error`, later runs generate normally."""

    def __init__(self, service: PipelineRunner, error: Exception) -> None:
        self.__dict__.update(service.__dict__)
        self.error = error

    def _run_batch(self, requests, on_events):
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return super()._run_batch(requests, on_events)


@pytest.mark.parametrize(
    ("error", "status", "words"),
    [
        (RuntimeError("CUDA error: an illegal memory access /secret/path"), 500, ["Generation failed (RuntimeError)"]),
        (torch.OutOfMemoryError("CUDA out of memory"), 503, ["ran out of memory", "lower resolution"]),
    ],
)
def test_failed_generation_is_json_and_the_next_request_succeeds(pipeline_runner, settings, error, status, words):
    with serving(settings, FailingOnce(pipeline_runner, error)) as client:
        failed = post_generate(client, png_bytes())
        assert_error(failed, status, *words)
        assert "/secret/path" not in failed.get_data(as_text=True)
        assert failed.headers["X-Request-ID"] in failed.get_json()["error"] or status == 503
        assert post_generate(client, png_bytes()).status_code == 200
        record(faults_injected=1, faults_survived=1)


def test_every_request_is_logged_without_key_or_prompt(client, settings):
    post_generate(client, png_bytes(), prompt="my secret prompt")
    post_generate(client, png_bytes(), headers={"x-api-key": "wrong-key"})
    lines = settings.log_file.read_text().splitlines()
    assert len(lines) == 2
    assert "method=POST path=/generate status=200" in lines[0]
    for part in ("request_id=", "client=127.0.0.1", "duration_ms=", "image=64x48", "prompt_chars=16", "generation_s="):
        assert part in lines[0]
    assert "status=401" in lines[1]
    text = settings.log_file.read_text()
    assert API_KEY not in text and "wrong-key" not in text and "my secret prompt" not in text


def test_readme_documents_every_generate_field(settings):
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("### `POST /generate`")[1].split("A field the endpoint does not know")[0]
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", table, re.M))
    names = {name for pair in documented for name in pair if name}
    assert names == {"image", *generate_fields_model(settings).model_fields}
