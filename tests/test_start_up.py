"""Start-up as a newcomer meets it: every model setting's own problem named before anything loads or downloads,
one line each and nothing after them; `make serve` installing only when the requirements changed."""

from __future__ import annotations

import os
import subprocess
import sys

import huggingface_hub
import pytest
from diffusers import ControlNetModel

from service.local import model_config
from service.settings import REPO_ROOT
from stable_diffusion import pipeline_initialization
from stable_diffusion.pipeline_initialization import (
    SD15_CANNY_FILE,
    ModelLoadError,
    build_tiny_pipeline,
    load_pipelines,
)
from tests.conftest import LiveServer, tiny_settings
from tests.images import drawing, encode
from tests.model_files import write_sd_checkpoint

HUB_CONTROLNET = "lllyasviel/sd-controlnet-canny"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_sd_checkpoint(build_tiny_pipeline(), tmp_path_factory.mktemp("start-up") / "tiny.safetensors")


def bad_model_file(kind: str, folder) -> tuple[str, str]:
    """A file as a newcomer might set SD_MODEL to, and the problem start-up must name."""
    if kind == "missing":
        return str(folder / "not-there.safetensors"), "no such file"
    path, content, problem = {
        "empty": (folder / "empty.safetensors", b"", "the file is empty"),
        "a JPEG renamed": (folder / "photo.safetensors", encode(drawing(), "JPEG"), "not a readable .safetensors file"),
        "a .ckpt": (folder / "model.ckpt", b"a pickle", "ALLOW_PICKLE_CHECKPOINTS=true"),
    }[kind]
    path.write_bytes(content)
    return str(path), problem


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("kind", ["missing", "empty", "a JPEG renamed", "a .ckpt"])
def test_a_bad_model_file_is_named_beside_the_controlnet_hub_error_one_line_each(tmp_path, offline, kind):
    path, problem = bad_model_file(kind, tmp_path)
    settings = tiny_settings(tmp_path, SD_MODEL=path, CONTROLNET_MODEL=HUB_CONTROLNET)

    with pytest.raises(ModelLoadError) as raised:
        load_pipelines(model_config(settings))

    model_line, controlnet_line = str(raised.value).splitlines()
    assert f"SD_MODEL={path}" in model_line and problem in model_line
    assert f"CONTROLNET_MODEL='{HUB_CONTROLNET}'" in controlnet_line and SD15_CANNY_FILE in controlnet_line


def test_a_good_model_file_with_the_hub_controlnet_offline_says_which_controlnet_file_to_pair(
    tmp_path, offline, model_file
):
    settings = tiny_settings(tmp_path, SD_MODEL=str(model_file), CONTROLNET_MODEL=HUB_CONTROLNET)

    with pytest.raises(ModelLoadError) as raised:
        load_pipelines(model_config(settings))

    (line,) = str(raised.value).splitlines()
    assert line.startswith(f"Could not load CONTROLNET_MODEL='{HUB_CONTROLNET}'") and SD15_CANNY_FILE in line


def test_a_bad_model_file_stops_start_up_before_anything_is_downloaded(tmp_path, monkeypatch):
    downloads = []

    def download(cls, name, **_):
        downloads.append(name)
        raise OSError("the test allows no download")

    monkeypatch.setattr(pipeline_initialization, "_hub_reachable", lambda: True)
    monkeypatch.setattr(ControlNetModel, "from_pretrained", classmethod(download))
    path, problem = bad_model_file("empty", tmp_path)
    settings = tiny_settings(tmp_path, SD_MODEL=path, CONTROLNET_MODEL=HUB_CONTROLNET)

    with pytest.raises(ModelLoadError, match=f"SD_MODEL={path}: {problem}"):
        load_pipelines(model_config(settings))
    assert downloads == []


def test_a_model_that_cannot_load_leaves_its_lines_last_without_gunicorns(tmp_path):
    path, _ = bad_model_file("empty", tmp_path)
    server = LiveServer(tmp_path, SD_MODEL=path, CONTROLNET_MODEL=HUB_CONTROLNET, HF_HUB_OFFLINE="1")
    try:
        assert server.process.wait(timeout=120) == 4
    finally:
        server.log.close()
    lines = server.output().splitlines()

    assert lines[-2].startswith(f"error: Could not load SD_MODEL={path}: the file is empty")
    assert lines[-1].startswith(f"error: Could not load CONTROLNET_MODEL='{HUB_CONTROLNET}'")
    noise = ("exited with code", "Shutting down", "App failed to load", "Traceback")
    assert [line for line in lines if any(phrase in line for phrase in noise)] == []


def dry_run(target: str, venv) -> str:
    """What `make <target>` would run, with `venv` as the virtual environment."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MAKE")}
    made = subprocess.run(
        ["make", "--dry-run", target, f"VENV={venv}"], cwd=REPO_ROOT, env=environment,
        capture_output=True, text=True, check=True,
    )
    return made.stdout


@pytest.mark.parametrize(
    ("target", "stamp", "requirements"),
    [("install", ".installed-requirements", ["requirements.txt"]),
     ("install-dev", ".installed-requirements-dev", ["requirements-dev.txt", "requirements.txt"])],
)
def test_make_installs_again_only_when_a_requirements_file_changed(tmp_path, target, stamp, requirements):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    assert "pip install" in dry_run(target, venv)

    newest = max((REPO_ROOT / name).stat().st_mtime for name in requirements)
    (venv / stamp).touch()
    os.utime(venv / stamp, (newest + 60, newest + 60))
    assert "pip install" not in dry_run(target, venv)

    for name in requirements:
        changed = (REPO_ROOT / name).stat().st_mtime
        os.utime(venv / stamp, (changed - 60, changed - 60))
        assert "pip install" in dry_run(target, venv), f"{name} changed, and make would not install"
        os.utime(venv / stamp, (newest + 60, newest + 60))


def test_start_up_says_when_the_environment_replaces_a_setting_of_the_env_file(tmp_path):
    env_file = tmp_path / "my.env"
    # An empty setting, as .env.example leaves API_KEY, is none to replace; a later line wins, as in dotenv.
    env_file.write_text("CORS_ORIGINS=\nAPI_KEY=\nAPI_KEY=from-the-file\nLOG_BACKUPS=5\n")
    # The environment's API_KEY (LiveServer's test key) differs from the file's; LOG_BACKUPS is the same.
    missing = str(tmp_path / "none.safetensors")
    server = LiveServer(tmp_path, SD_ENV_FILE=str(env_file), SD_MODEL=missing, LOG_BACKUPS="5", CORS_ORIGINS="")
    try:
        server.process.wait(timeout=120)
    finally:
        server.log.close()

    notes = [line for line in server.output().splitlines() if line.startswith("note:")]
    assert notes == ["note: the environment sets API_KEY, which replaces what .env says"]
    assert "from-the-file" not in server.output()
