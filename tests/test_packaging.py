"""The packaging, as a user installs it: `pip install .` into a fresh virtual environment (no system site
packages) is the client alone, without torch, with its `sd-client` command; and the requirements files that
the README installs the server from list what pyproject.toml declares.

The environment is made once per module (about 10 s: pip reads the packages from its index, PyPI or the
machine's local mirror, which it must be able to reach)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from service.settings import REPO_ROOT
from tests.conftest import API_KEY
from tests.images import png_bytes

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def client_env(tmp_path_factory) -> Path:
    """A fresh venv with `pip install .`, built from a copy of what the package is made of, so that the
    checkout gets no build/ or egg-info and nothing outside those files can leak into the install."""
    root = tmp_path_factory.mktemp("client_install")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "stable_diffusion", source / "stable_diffusion",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", env], check=True, timeout=120)
    installed = subprocess.run([env / "bin" / "pip", "install", "--quiet", source],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return env


def run_in(venv: Path, *command: str | Path, **kwargs) -> subprocess.CompletedProcess:
    # Away from the checkout, so that `stable_diffusion` can only come from the install.
    return subprocess.run([venv / "bin" / command[0], *command[1:]], cwd=venv, capture_output=True, text=True,
                          timeout=120, **kwargs)


def package_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower() for line in requirements}


def test_the_client_installs_alone_without_torch(client_env):
    listed = run_in(client_env, "pip", "list", "--format", "json")
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert {"requests", "sseclient-py", "tqdm"} <= installed
    server_only = package_names(PYPROJECT["project"]["optional-dependencies"]["server"])
    assert installed & server_only == set()

    imported = run_in(client_env, "python", "-c",
                      "import sys, stable_diffusion.client; print(stable_diffusion.client.__file__); "
                      "assert 'torch' not in sys.modules, 'the client imported torch'")
    assert imported.returncode == 0, imported.stderr
    assert "site-packages" in imported.stdout


def test_sd_client_and_the_module_both_answer_help(client_env):
    script = run_in(client_env, "sd-client", "--help")
    assert script.returncode == 0, script.stderr
    assert script.stdout.startswith("usage: sd-client") and "generate" in script.stdout

    module = run_in(client_env, "python", "-m", "stable_diffusion.client", "generate", "--help")
    assert module.returncode == 0, module.stderr
    assert module.stdout.startswith("usage: python -m stable_diffusion.client generate")
    assert "--ca-cert" in module.stdout


def test_the_installed_client_generates_a_picture(client_env, live_server, tmp_path):
    (tmp_path / "in.png").write_bytes(png_bytes())
    completed = run_in(
        client_env, "sd-client", "generate", tmp_path / "in.png", "a red door", "--seed", "3", "--quiet",
        "--url", live_server.url, "--ca-cert", live_server.cert, "-o", tmp_path / "out.png",
        env={"SD_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr
    assert "seed 3" in completed.stdout
    assert Image.open(tmp_path / "out.png").format == "PNG"


def test_the_requirements_files_list_what_pyproject_declares():
    """requirements.txt is the client's and the server's dependencies; requirements-dev.txt adds the dev extra."""
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]

    def lines(name: str) -> list[str]:
        text = (REPO_ROOT / name).read_text()
        return [line.strip() for line in text.splitlines() if line.strip() and line[0] not in "#-"]

    assert sorted(lines("requirements.txt")) == sorted(project["dependencies"] + extras["server"])
    dev = [requirement for requirement in extras["dev"] if not requirement.startswith(project["name"])]
    assert sorted(lines("requirements-dev.txt")) == sorted(dev)
