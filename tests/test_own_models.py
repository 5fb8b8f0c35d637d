"""Models people bring: single-file checkpoints for SD_MODEL and CONTROLNET_MODEL, and LoRAs from LORA_DIR,
with a real server started on files these tests write (the tiny architecture in the original layout)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from service.distributed import wire
from service.local import model_config
from service.settings import REPO_ROOT
from service.storage import new_file_stem
from stable_diffusion.image_processing import DecodedImage
from stable_diffusion.pipeline_initialization import ModelLoadError, build_tiny_pipeline, load_pipelines
from stable_diffusion.recipe import GenerationRequest
from tests import rewrite_in_place
from tests.conftest import API_KEY, LiveServer, tiny_settings
from tests.images import png_bytes
from tests.model_files import (
    write_controlnet_checkpoint,
    write_kohya_lora,
    write_sd_checkpoint,
    write_wrong_architecture_lora,
)
from tests.test_batching import assert_same_picture

HEADERS = {"x-api-key": API_KEY}
FIELDS = {"prompt": "a lighthouse", "seed": "7", "refine_strength": "0.3"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model as single files, and a LoRA folder with good and bad files."""
    folder = tmp_path_factory.mktemp("own-models")
    pipe = build_tiny_pipeline()
    loras = folder / "lora"
    loras.mkdir()
    made = {
        "model": write_sd_checkpoint(pipe, folder / "tiny-model.safetensors"),
        "controlnet": write_controlnet_checkpoint(pipe.controlnet, folder / "tiny-canny.safetensors"),
        "ink": write_kohya_lora(pipe.unet, pipe.text_encoder, loras / "ink.safetensors", seed=1),
        "paper": write_kohya_lora(pipe.unet, pipe.text_encoder, loras / "paper.safetensors", seed=2),
        "wrong-width": write_wrong_architecture_lora(loras / "wrong-width.safetensors"),
    }
    ink = made["ink"].read_bytes()
    (loras / "broken.safetensors").write_bytes(ink[: len(ink) // 2])
    # The text encoder's half of ink alone: it changes the picture only if it lands on the text encoder.
    ink_tensors = load_file(made["ink"])
    save_file({key: value for key, value in ink_tensors.items() if key.startswith("lora_te_")},
              str(loras / "ink-text.safetensors"))
    # ink with a text-encoder layer more than the model has: diffusers alone would load the rest and say nothing.
    deeper = {key.replace("layers_0_", "layers_7_"): value.clone()
              for key, value in ink_tensors.items() if key.startswith("lora_te_text_model_encoder_layers_0_")}
    save_file(ink_tensors | deeper, str(loras / "deeper.safetensors"))
    # A valid safetensors file that holds no LoRA (a textual-inversion embedding).
    save_file({"emb_params": torch.zeros(2, 32)}, str(loras / "embedding.safetensors"))
    (loras / "snapshot.safetensors").write_bytes(png_bytes())
    (loras / "empty.safetensors").write_bytes(b"")
    (loras / "notes.txt").write_text("not a LoRA file: never listed")
    # A pickle is never a LoRA: the folder's .safetensors files are all that is listed and loaded.
    (loras / "evil.ckpt").write_bytes(b"never unpickled")
    # Non-finite weights: NaN, infinity, and finite weights that an alpha of 1e38 scales past any precision.
    up = next(key for key in ink_tensors if key.endswith("lora_up.weight"))
    for name, value in (("nan", math.nan), ("inf", math.inf)):
        spoiled = {key: tensor.clone() for key, tensor in ink_tensors.items()}
        spoiled[up][0, 0] = value
        save_file(spoiled, str(loras / f"{name}.safetensors"))
    save_file({key: torch.tensor(1e38) if key.endswith(".alpha") else tensor for key, tensor in ink_tensors.items()},
              str(loras / "huge-alpha.safetensors"))
    # ink in 8-bit floats (torch has no isfinite for them), and a header whose tensor has no place in the file.
    save_file({key: tensor.to(torch.float8_e4m3fn) for key, tensor in ink_tensors.items()},
              str(loras / "fp8.safetensors"))
    header = json.dumps({"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": None}})
    (loras / "malformed.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode())
    # Links: only a file of the folder itself is a LoRA, never what a link outside it points at.
    outside = folder / "outside"
    outside.mkdir()
    shutil.copy(made["ink"], outside / "ink-copy.safetensors")
    (loras / "elsewhere.safetensors").symlink_to(outside / "ink-copy.safetensors")
    (loras / "passwd.safetensors").symlink_to("/etc/passwd")
    (loras / "alias.safetensors").symlink_to("ink.safetensors")
    return made


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    """Offline, on the single files; LORA_CACHE=1, so that switching LoRAs also unloads them."""
    server = LiveServer(
        tmp_path_factory.mktemp("own-models-server"),
        SD_MODEL=str(files["model"]), CONTROLNET_MODEL=str(files["controlnet"]), LORA_DIR=str(files["ink"].parent),
        LORA_CACHE="1", HF_HUB_OFFLINE="1", RATE_LIMIT_PER_MINUTE="0", BATCH_WAIT_MS="300",
    )
    server.wait_until_healthy()
    yield server
    server.stop()


def generate(server, **fields) -> requests.Response:
    return requests.post(
        f"{server.url}/generate", headers=HEADERS, files={"image": ("photo.png", png_bytes())},
        data=FIELDS | fields, verify=server.cert, timeout=120,
    )


def pixels(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def png_text(response: requests.Response) -> dict[str, str]:
    return Image.open(io.BytesIO(response.content)).text


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_single_file_checkpoint_loads_offline_and_paints_as_the_model_it_was_made_from(server, files, live_server):
    """The tiny model written in the original layout paints the same pixels as the built-in tiny model."""
    own = generate(server)
    assert np.array_equal(pixels(own), pixels(generate(live_server)))
    parameters = png_text(own)["parameters"]
    assert f"Model hash: {sha256(files['model'])[:10]}, Model: tiny-model + tiny-canny," in parameters
    assert json.loads(png_text(own)["recipe"])["model_hash"] == sha256(files["model"])[:10]


def test_models_lists_the_model_the_controlnet_and_the_loras_with_size_and_hash(server, files):
    models = wait_for_hashes(server)
    assert models["sd_model"] == {
        "name": "tiny-model", "size_bytes": files["model"].stat().st_size, "sha256": sha256(files["model"])
    }
    assert models["controlnet_model"]["name"] == "tiny-canny"
    assert models["controlnet_model"]["sha256"] == sha256(files["controlnet"])
    listed = {lora["name"]: lora for lora in models["loras"]}
    # What the headers say are LoRAs for the tiny model; deeper and the non-finite ones are refused when loaded.
    assert set(listed) == {"alias", "deeper", "fp8", "huge-alpha", "inf", "ink", "ink-text", "nan", "paper"}
    skipped = next(line for line in server.output().splitlines() if "LORA_DIR: not listed as LoRAs" in line)
    for name, why in [("broken", "truncated"), ("embedding", "holds no LoRA weights"), ("empty", "no safetensors"),
                      ("malformed", "a tensor without a place in the file"),
                      ("snapshot", "no safetensors header"), ("wrong-width", "made for a model attending to text 64 "
                                                                              "wide, not for the tiny model")]:
        assert f"{name} (" in skipped and why in skipped.split(f"{name} (")[1].split(")")[0], (name, skipped)
    ink = files["ink"].read_bytes()
    header_end = 8 + int.from_bytes(ink[:8], "little")
    assert listed["ink"] == {
        "name": "ink", "size_bytes": len(ink), "sha256": hashlib.sha256(ink).hexdigest(),
        "short_hash": hashlib.sha256(ink[header_end:]).hexdigest()[:12],
    }
    unauthorized = requests.get(f"{server.url}/models", verify=server.cert, timeout=10)
    assert unauthorized.status_code == 401


def wait_for_hashes(server, timeout: float = 30) -> dict:
    """/models once the server has hashed every file it lists (in the background: null until then)."""
    deadline = time.monotonic() + timeout
    while True:
        models = requests.get(f"{server.url}/models", headers=HEADERS, verify=server.cert, timeout=10).json()
        entries = [models["sd_model"], models["controlnet_model"], *models["loras"]]
        if all(entry["sha256"] for entry in entries) or time.monotonic() > deadline:
            return models
        time.sleep(0.1)


def test_a_lora_changes_the_picture_and_the_recipe_names_it_as_automatic1111_does(server, files):
    plain = pixels(generate(server))
    with_field = generate(server, loras="ink:0.8")
    assert not np.array_equal(pixels(with_field), plain)
    ink = files["ink"].read_bytes()
    short_hash = hashlib.sha256(ink[8 + int.from_bytes(ink[:8], "little"):]).hexdigest()[:12]
    prompt_line, _, settings_line = png_text(with_field)["parameters"].splitlines()
    assert prompt_line == "a lighthouse <lora:ink:0.8>"
    assert f'Lora hashes: "ink: {short_hash}"' in settings_line
    recipe = json.loads(png_text(with_field)["recipe"])
    assert recipe["loras"] == "ink:0.8" and recipe["prompt"] == "a lighthouse"
    assert recipe["lora_hashes"] == {"ink": short_hash}
    # As AUTOMATIC1111 users type it: the tag leaves the prompt and paints the same picture.
    in_prompt = generate(server, prompt="a lighthouse <lora:ink:0.8>")
    assert np.array_equal(pixels(in_prompt), pixels(with_field))
    stronger = generate(server, loras="ink:1.6")
    assert not np.array_equal(pixels(stronger), pixels(with_field))


def test_after_a_lora_a_request_without_one_paints_as_a_fresh_server(server, live_server):
    fresh = pixels(generate(live_server, seed="11"))
    assert generate(server, seed="11", loras="paper:1").status_code == 200
    assert np.array_equal(pixels(generate(server, seed="11")), fresh)
    assert generate(server, seed="11", loras="ink:-1,paper:0.5").status_code == 200
    assert np.array_equal(pixels(generate(server, seed="11")), fresh)


def test_requests_with_different_loras_at_once_each_paint_as_when_run_alone(server):
    """Queued together (one LoRA loaded at a time: LORA_CACHE=1), every request gets its own LoRA set and
    nothing of its neighbours'; requests with the same set share a run."""
    asked = [{"loras": "ink:1"}, {"loras": "paper:1"}, {"loras": "ink:1", "seed": "8"}, {}, {"loras": "paper:-1"}]
    together: list[requests.Response | None] = [None] * len(asked)

    def send(index: int) -> None:
        together[index] = generate(server, **asked[index])

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(asked))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    alone = [pixels(generate(server, **fields)) for fields in asked]
    for index, response in enumerate(together):
        # Within the rounding a batch may bring (see test_batching); a neighbour's LoRA would be far beyond it.
        assert_same_picture(pixels(response), alone[index])
    assert len({pixels(response).tobytes() for response in together}) == len(asked)
    output = server.output()
    assert "loaded LoRA ink" in output and "unloaded LoRA ink" in output
    # The two ink requests were queued together, so they shared a run; different sets never do.
    ink_ids = {together[index].headers["X-Request-ID"] for index in (0, 2)}
    shared = [set(re.findall(r"[0-9a-f]{32}", line)) for line in output.splitlines() if "share one run" in line]
    assert ink_ids in shared
    other_ids = {together[index].headers["X-Request-ID"] for index in (1, 3, 4)}
    assert not any(len(run & ink_ids) and len(run & other_ids) for run in shared)


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ("nothing-here:1", "no LoRA named 'nothing-here'; available: alias, broken, deeper, embedding, empty, fp8, "
                           "huge-alpha, inf, ink, ink-text, malformed, nan, paper, snapshot, wrong-width"),
        ("malformed:1", "the file of LoRA 'malformed' is not a readable .safetensors file"),
        ("ink:\u0661", "the weight of LoRA 'ink' is '\u0661'"),
        ("passwd:1", "no LoRA named 'passwd'"),
        ("elsewhere:1", "no LoRA named 'elsewhere'"),
        ("nan:1", "the file of LoRA 'nan' holds non-finite weights (NaN or infinity"),
        ("inf:1", "the file of LoRA 'inf' holds non-finite weights (NaN or infinity"),
        ("huge-alpha:1", "the file of LoRA 'huge-alpha' holds non-finite weights (NaN or infinity, or an alpha"),
        ("../lora/ink:1", "does not name a LoRA"),
        ("/etc/passwd", "does not name a LoRA"),
        ("ink:2.5", "the weight of LoRA 'ink' is '2.5'; send a number from -2 to 2"),
        ("ink:lots", "the weight of LoRA 'ink'"),
        ("ink:1,ink:0.5", "LoRA 'ink' is named twice"),
        ("notes", "no LoRA named 'notes'"),
        ("evil:1", "no LoRA named 'evil'"),
        ("broken:1", "LoRA 'broken' is not a readable .safetensors file"),
        ("snapshot:1", "LoRA 'snapshot' is not a readable .safetensors file"),
        ("empty:1", "LoRA 'empty' is not a readable .safetensors file"),
        ("wrong-width:1", "LoRA 'wrong-width' is made for a model attending to text 64 wide, and this server runs "
                          "the tiny model; use a LoRA made for the tiny model."),
        ("embedding:1", "the file of LoRA 'embedding' holds no LoRA weights"),
        ("deeper:1", "LoRA 'deeper' does not fit the tiny model, the model this server runs: its text_encoder "
                     "weights did not land on the model's layers. Use a LoRA made for the tiny model."),
    ],
)
def test_a_bad_lora_is_a_clear_400_and_the_server_keeps_painting_as_before(server, live_server, loras, message):
    response = generate(server, loras=loras)  # within generate()'s timeout, however long the field
    assert response.status_code == 400, response.text
    assert message in response.json()["error"] and response.json()["error"].startswith("loras: ")
    assert np.array_equal(pixels(generate(server, seed="12")), pixels(generate(live_server, seed="12")))


def test_a_refused_lora_is_checked_once_per_file_version(server, files):
    """A bad file is read and checked once; the next request naming it is refused from memory, until the
    file changes."""
    nan = files["ink"].parent / "nan.safetensors"
    for _ in range(2):
        assert generate(server, loras="nan:1").status_code == 400
    assert server.output().count("refused LoRA nan:") == 1
    nan.write_bytes(nan.read_bytes())  # the same bytes, written again: another version of the file
    assert generate(server, loras="nan:1").status_code == 400
    assert server.output().count("refused LoRA nan:") == 2


@pytest.mark.parametrize("removing", [False, True], ids=["overwritten", "removed-and-copied-back"])
def test_a_lora_changed_while_requested_costs_at_most_a_400_and_never_the_server(server, files, removing):
    """safetensors maps a file into memory; a file truncated under that map killed the server (SIGBUS), and a
    file gone between the name check and the load was a 500. Files are now read whole, one version at a time:
    a request gets the old or the new file whole, or a 400 naming it; requests without it are untouched."""

    folder = files["ink"].parent
    moving = folder / "moving.safetensors"
    versions = rewrite_in_place.padded_versions(files["ink"], folder.parent)
    shutil.copy(versions[0], moving)
    stop = threading.Event()
    answers: dict[str, list] = {"moving": [], "none": []}
    workers_before = server.output().count("Booting worker")

    def client(loras: str, kind: str) -> None:
        while not stop.is_set():
            try:
                answers[kind].append(generate(server, loras=loras, steps="2"))
            except requests.RequestException as exc:  # the connection dropped: the process serving it died
                answers[kind].append(exc)

    writer = rewrite_in_place.start(moving, 5, versions, removing)
    clients = [threading.Thread(target=client, args=(f"moving:0.{index}", "moving")) for index in range(1, 3)]
    clients += [threading.Thread(target=client, args=("", "none"))]
    try:
        for thread in clients:
            thread.start()
        writer.wait(timeout=60)
    finally:
        stop.set()
        writer.kill()
        for thread in clients:
            thread.join(timeout=120)
        moving.unlink(missing_ok=True)
    assert server.output().count("Booting worker") == workers_before, server.output()[-3000:]
    assert len(answers["moving"]) >= 4 and answers["none"]
    for response in answers["moving"]:
        assert isinstance(response, requests.Response) and response.status_code in (200, 400), response
        if response.status_code == 400:
            assert re.match(r"loras: .*'moving'", response.json()["error"]), response.text
    assert all(isinstance(response, requests.Response) and response.ok for response in answers["none"])
    assert generate(server, loras="ink:0.3").status_code == 200


@pytest.mark.parametrize("moment", ["gone after the listing", "back after the check"])
def test_a_lora_removed_or_copied_back_between_two_looks_is_a_400(tmp_path, files, moment):
    """The two races the loop above hits only now and then, made certain: a file listed and then gone before
    it is read, and one missing from the listing but back when the check looks again (a 500 each before)."""
    from service.errors import InvalidField
    from stable_diffusion.lora_library import LoraLibrary

    ink = tmp_path / "ink.safetensors"
    shutil.copy(files["ink"], ink)

    class Racing(LoraLibrary):
        def names(self):
            if moment == "gone after the listing":
                listed = super().names()
                ink.unlink(missing_ok=True)
                return listed
            if ink.exists():
                ink.unlink()
                return super().names()
            shutil.copy(files["ink"], ink)
            return super().names()

    with pytest.raises(InvalidField, match=r"^loras: the file of LoRA 'ink' cannot be read \("):
        Racing(tmp_path).read("ink")


def test_models_answers_at_once_and_each_file_is_hashed_once_in_the_background(server, files):
    """Hashing a large file held the first /models for seconds, and the generator hashed it again."""
    from safetensors.torch import save

    folder = files["ink"].parent
    big, fresh = folder / "big.safetensors", folder / "fresh.safetensors"
    big.write_bytes(save(load_file(files["ink"]) | {"padding": torch.ones(64_000_000)}))
    shutil.copy(files["paper"], fresh)
    try:
        first = requests.get(f"{server.url}/models", headers=HEADERS, verify=server.cert, timeout=10).json()
        listed = {lora["name"]: lora for lora in first["loras"]}
        assert listed["big"]["size_bytes"] == big.stat().st_size and listed["big"]["sha256"] is None
        hashed = {lora["name"]: lora for lora in wait_for_hashes(server)["loras"]}
        assert hashed["big"]["sha256"] == sha256(big) and hashed["fresh"]["sha256"] == sha256(fresh)
        # The generator loads fresh (the same version the listing hashed) and takes its hash from memory.
        made = generate(server, loras="fresh:0.5")
        assert json.loads(png_text(made)["recipe"])["lora_hashes"]["fresh"] == hashed["fresh"]["short_hash"]
        assert server.output().count("hashed fresh.safetensors") == 1
    finally:
        big.unlink()
        fresh.unlink()


def test_a_checkpoint_rewritten_while_read_is_refused_or_read_whole_never_a_dead_process(tmp_path):
    """At start-up too, a file changing under the reader is a clear error (or one version's tensors), run in a
    process of its own, which a SIGBUS would kill."""
    versions = [tmp_path / f"version-{seed}.safetensors" for seed in (1, 2)]
    for seed, version in enumerate(versions, start=1):
        save_file({"weight": torch.full((12_000_000,), float(seed))}, str(version))
    path = tmp_path / "model.safetensors"
    shutil.copy(versions[0], path)
    script = f"""
import time
from pathlib import Path
from stable_diffusion.checkpoints import read_checkpoint
from stable_diffusion.errors import ModelLoadError

path, outcomes, deadline = Path({str(path)!r}), [], time.monotonic() + 4
while time.monotonic() < deadline:
    try:
        tensors, _ = read_checkpoint("SD_MODEL", path, allow_pickle=False)
        values = tensors["weight"].unique().tolist()
        assert values in ([1.0], [2.0]), values
        outcomes.append("whole")
    except ModelLoadError as exc:
        assert str(exc).startswith(f"Could not load SD_MODEL={{path}}: "), exc
        outcomes.append("refused")
print(sorted(set(outcomes)), len(outcomes))
"""
    writer = rewrite_in_place.start(path, 5, versions)
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300)
    finally:
        writer.kill()
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "'whole'" in done.stdout, done.stdout


def test_a_lora_in_8_bit_floats_is_read_never_a_500(server):
    """torch has no isfinite for 8-bit floats: the check widened them, where it failed every request with a 500."""
    assert generate(server, loras="fp8:1").status_code in (200, 400)


def test_a_field_of_thousands_of_loras_is_refused_at_once(server):
    """Counted before anything is parsed: tens of thousands of names (up to the form's 256 KB) never hold a
    thread for long (comparing every name with every other took 40 s)."""
    names = ",".join(f"n{index}" for index in range(36_000))
    response = requests.post(
        f"{server.url}/generate", headers=HEADERS, files={"image": ("photo.png", png_bytes())},
        data=FIELDS | {"loras": names}, verify=server.cert, timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "loras: 36000 LoRAs; a request may use at most 8."


def test_a_bad_lora_in_the_prompt_is_a_clear_400(server):
    response = generate(server, prompt="a lighthouse <lora:ink:heavy>")
    assert response.status_code == 400
    assert response.json()["error"].startswith("prompt: the weight of LoRA 'ink'")
    many = generate(server, prompt="a lighthouse" + "<lora:ink:1>" * 20_000)
    assert many.status_code == 400 and many.json()["error"] == "prompt: 20000 LoRAs; a request may use at most 8."


def test_the_text_encoders_half_of_a_lora_takes_effect(server):
    """A LoRA of the text encoder alone changes the picture: its weights land on the text encoder's layers."""
    plain = pixels(generate(server, seed="13"))
    text_only = pixels(generate(server, seed="13", loras="ink-text:1"))
    assert np.abs(text_only.astype(int) - plain).mean() > 1


def test_without_a_lora_folder_naming_a_lora_is_a_clear_400(tmp_path):
    from service.errors import InvalidField
    from service.fields import generate_fields_model, parse_fields

    settings = tiny_settings(tmp_path, LORA_DIR=str(tmp_path / "no-such-folder"))
    fields = generate_fields_model(settings)
    assert parse_fields(fields, {"prompt": "a lighthouse"}).loras == ()
    with pytest.raises(InvalidField, match=r"^loras: this server has no LoRAs \(its LORA_DIR is not a folder\)\.$"):
        parse_fields(fields, {"prompt": "a lighthouse", "loras": "ink:1"})


def test_a_lora_set_travels_to_a_gpu_worker_intact():
    """QUEUE_BACKEND=celery: the task's JSON gives back a request that batches like the one sent."""
    request = GenerationRequest("r", (Image.new("RGB", (64, 64)),), "p", loras=(("ink", 0.8), ("paper", -1.0)))
    sent = wire.request_message(request, DecodedImage("PNG", (), (), 0), "owner", new_file_stem(), job=False)
    message = json.loads(json.dumps(sent))
    received, *_ = wire.read_request(message, max_frames=1)
    assert received.loras == request.loras and hash(received.loras) == hash(request.loras)


# Start-up: a file that is not an SD 1.5 checkpoint is one clear line naming the setting and what was found.


def _fake(path, tensors: dict[str, tuple[int, ...]]):
    import torch
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, str(path))
    return path


def _bad_model_files(folder, files) -> dict[str, tuple]:
    model = files["model"].read_bytes()
    return {
        "empty": (folder / "empty.safetensors", b"", "the file is empty"),
        "truncated": (folder / "cut.safetensors", model[: len(model) // 3], "not a readable .safetensors file"),
        "a PNG renamed": (folder / "photo.safetensors", png_bytes(), "not a readable .safetensors file"),
        "SDXL": (_fake(folder / "xl.safetensors", {"conditioner.embedders.1.model.ln_final.weight": (4,)}), None,
                 "the file holds an SDXL model. This service runs SD 1.5 models."),
        "SD 2": (_fake(folder / "v2.safetensors", {"cond_stage_model.model.ln_final.weight": (4,),
                                                   "model.diffusion_model.out.2.bias": (4,)}), None,
                 "the file holds an SD 2.x model"),
        "a LoRA": (files["ink"], None, "the file holds a LoRA. Put it in LORA_DIR."),
        "a ControlNet": (files["controlnet"], None, "the file holds a ControlNet. Set it as CONTROLNET_MODEL."),
        "a pickle": (folder / "model.ckpt", b"not read", "a .ckpt file is a Python pickle"),
    }


@pytest.mark.parametrize(
    "kind", ["empty", "truncated", "a PNG renamed", "SDXL", "SD 2", "a LoRA", "a ControlNet", "a pickle"]
)
def test_a_model_file_that_is_no_sd15_checkpoint_is_named_at_load(tmp_path, files, kind):
    path, content, message = _bad_model_files(tmp_path, files)[kind]
    if content is not None:
        path.write_bytes(content)
    settings = tiny_settings(tmp_path, SD_MODEL=str(path), CONTROLNET_MODEL=str(files["controlnet"]))
    with pytest.raises(ModelLoadError) as raised:
        load_pipelines(model_config(settings))
    assert f"SD_MODEL={path}" in str(raised.value) and message in str(raised.value)


def test_a_controlnet_file_that_is_a_model_says_so(tmp_path, files):
    settings = tiny_settings(tmp_path, SD_MODEL=str(files["model"]), CONTROLNET_MODEL=str(files["model"]))
    with pytest.raises(ModelLoadError, match=r"CONTROLNET_MODEL=.*holds an SD 1.x model, not a ControlNet"):
        load_pipelines(model_config(settings))


def test_a_truncated_model_file_stops_the_server_with_one_clear_line(tmp_path, files):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files["model"].read_bytes()[:100_000])
    server = LiveServer(tmp_path, SD_MODEL=str(cut), CONTROLNET_MODEL=str(files["controlnet"]), HF_HUB_OFFLINE="1")
    try:
        assert server.process.wait(timeout=120) != 0
    finally:
        server.log.close()
    output = server.output()
    assert re.search(rf"Could not load SD_MODEL={re.escape(str(cut))}: it is not a readable \.safetensors file", output)
    assert "Traceback" not in output


def test_a_pickle_checkpoint_runs_no_code_unless_allowed_and_then_loads(tmp_path, files):
    import pickle

    import torch
    from safetensors.torch import load_file

    marker = tmp_path / "the pickle ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    hostile = tmp_path / "hostile.ckpt"
    hostile.write_bytes(pickle.dumps({"state_dict": Payload()}))
    refused = tiny_settings(tmp_path, SD_MODEL=str(hostile), CONTROLNET_MODEL=str(files["controlnet"]))
    with pytest.raises(ModelLoadError, match="ALLOW_PICKLE_CHECKPOINTS=true"):
        load_pipelines(model_config(refused))
    assert not marker.exists()

    trusted = tmp_path / "trusted.ckpt"
    torch.save({"state_dict": load_file(files["model"])}, trusted)
    allowed = tiny_settings(
        tmp_path, SD_MODEL=str(trusted), CONTROLNET_MODEL=str(files["controlnet"]), ALLOW_PICKLE_CHECKPOINTS="true"
    )
    pipelines = load_pipelines(model_config(allowed))
    assert pipelines.names == ("trusted", "tiny-canny") and pipelines.sd_file.short_hash == sha256(trusted)[:10]


# The full-size SD 1.5 layout, written once per test session from the shipped configs: every weight zero (what
# is tested is the layout and its shapes; random values took 30 s to make, write and read back).


@pytest.fixture(scope="session")
def full_size_files(tmp_path_factory):
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stable_diffusion.pipeline_initialization import FULL_SIZE_MODEL_DIR

    folder = tmp_path_factory.mktemp("sd15-files")
    config = {name: json.loads((FULL_SIZE_MODEL_DIR / f"{name}.json").read_text())
              for name in ("unet", "controlnet", "vae", "text_encoder")}
    with torch.device("meta"):  # shapes, no values
        pipe = SimpleNamespace(
            unet=UNet2DConditionModel(**config["unet"]), vae=AutoencoderKL(**config["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
            controlnet=ControlNetModel(**config["controlnet"]),
        )
    model = write_sd_checkpoint(pipe, folder / "sd15-random.safetensors", dtype=torch.float16)
    controlnet = write_controlnet_checkpoint(pipe.controlnet, folder / "sd15-canny.safetensors", dtype=torch.float16)
    return model, controlnet


def test_an_sd15_file_loads_offline_with_the_sd15_architecture_and_the_clip_tokenizer(full_size_files, monkeypatch):
    from stable_diffusion.config import ModelConfig
    from stable_diffusion.pipeline_runner import PipelineRunner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, controlnet = full_size_files
    pipelines = load_pipelines(ModelConfig(str(model), str(controlnet), device="cpu"))
    pipe = pipelines.generate
    assert list(pipe.unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert pipe.unet.config.cross_attention_dim == 768
    assert pipe.controlnet.config.cross_attention_dim == 768 and pipe.text_encoder.config.hidden_size == 768
    # CLIP ViT-L/14's own token ids: real prompts mean to the model what they meant in training.
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    request = GenerationRequest("sd15", (Image.new("RGB", (64, 64)),), "a photo of a cat", steps=1)
    assert PipelineRunner(pipelines).run(request).images[0].size == (64, 64)
