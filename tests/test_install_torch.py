"""scripts/install_torch.py: the torch build `make install` chooses, in a fresh environment without torch."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import venv
from pathlib import Path

import pytest

from service.settings import REPO_ROOT
from tests.conftest import free_port

SCRIPT = REPO_ROOT / "scripts" / "install_torch.py"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A new virtual environment's Python, without torch, as `make install` finds it on a new machine."""
    folder = tmp_path_factory.mktemp("venv")
    venv.create(folder, with_pip=False)
    return folder / "bin" / "python"


def choose(python: Path, tmp_path: Path, **environment: str) -> subprocess.CompletedProcess:
    """A dry run with only the system's programs and those put in tmp_path/bin on the PATH."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "TORCH_CPU_INDEX": f"http://127.0.0.1:{free_port()}/"}
    return subprocess.run(
        [str(python), str(SCRIPT), "--dry-run"], env=env | environment, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def cpu_index():
    """A reachable package index standing in for PyTorch's CPU index."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


def test_no_gpu_chooses_the_cpu_index(bare_python, tmp_path, cpu_index):
    completed = choose(bare_python, tmp_path, TORCH_CPU_INDEX=cpu_index)
    assert completed.returncode == 0
    first, command = completed.stdout.splitlines()
    assert first.startswith("install_torch: the cpu build (no NVIDIA or AMD GPU found)")
    assert command.endswith(f"-m pip install torch --index-url {cpu_index}")


def test_unreachable_cpu_index_falls_back_to_pypi_and_says_so(bare_python, tmp_path):
    completed = choose(bare_python, tmp_path)
    assert completed.returncode == 0
    first, command = completed.stdout.splitlines()
    assert "the cpu build" in first and "cannot be reached" in first
    assert command.endswith("-m pip install torch")


def test_an_nvidia_gpu_chooses_the_cuda_build(bare_python, tmp_path):
    (tmp_path / "bin").mkdir()
    nvidia_smi = tmp_path / "bin" / "nvidia-smi"
    nvidia_smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    nvidia_smi.chmod(0o755)
    completed = choose(bare_python, tmp_path)
    assert "the cuda build (an NVIDIA GPU answered nvidia-smi), from PyPI" in completed.stdout


def test_torch_variant_overrides_and_rocm_needs_the_local_wheels(bare_python, tmp_path):
    completed = choose(bare_python, tmp_path, TORCH_VARIANT="rocm")
    assert completed.returncode != 0 and "local_packages" in completed.stderr
    completed = choose(bare_python, tmp_path, TORCH_VARIANT="vulkan")
    assert completed.returncode == 2 and "cpu, cuda, rocm" in completed.stderr


def test_an_installed_torch_is_kept(tmp_path):
    completed = choose(Path(sys.executable), tmp_path)
    assert completed.returncode == 0 and "is already installed; keeping it" in completed.stdout
