"""Installs the torch build that fits this machine into the running Python, and says in one line which.

`make install` runs it before requirements.txt, so pip never pulls the multi-GB CUDA build onto a machine
without an NVIDIA GPU. TORCH_VARIANT=cpu|cuda|rocm overrides what it finds; a torch already installed is
kept. Standard library only: it runs in a fresh virtual environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

VARIANTS = ("cpu", "cuda", "rocm")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LOCAL_PACKAGES = Path(__file__).resolve().parent.parent / "local_packages"
ROCM_PACKAGES = ["torch", "torchvision", "pytorch-triton-rocm"]


def detect_variant() -> tuple[str, str]:
    """The build this machine needs, and why."""
    if platform.system() == "Darwin":
        return "cpu", "macOS (PyPI's build runs on the CPU and Apple's MPS)"
    if _succeeds(["nvidia-smi", "-L"]):
        return "cuda", "an NVIDIA GPU answered nvidia-smi"
    if Path("/dev/kfd").exists() or _succeeds(["rocminfo"]):
        return "rocm", "an AMD GPU was found (/dev/kfd or rocminfo)"
    return "cpu", "no NVIDIA or AMD GPU found"


def install_command(variant: str, cpu_index: str) -> tuple[list[str], str]:
    """The pip command for `variant`, and a note on where it installs from."""
    pip = [sys.executable, "-m", "pip", "install"]
    if variant == "rocm":
        if not any(LOCAL_PACKAGES.glob("torch-*.whl")):
            raise SystemExit(
                f"install_torch: TORCH_VARIANT is rocm but {LOCAL_PACKAGES} holds no torch wheel; put the ROCm "
                "wheels of torch, torchvision and pytorch-triton-rocm there (see README)."
            )
        local = [*pip, "--no-index", "--find-links", str(LOCAL_PACKAGES), *ROCM_PACKAGES]
        return local, "the ROCm wheels in local_packages/"
    if variant == "cuda" or platform.system() != "Linux":
        return [*pip, "torch"], "PyPI"
    if _reachable(cpu_index):
        return [*pip, "torch", "--index-url", cpu_index], cpu_index
    # PyPI's Linux build bundles CUDA: large, but it runs on the CPU as well.
    return [*pip, "torch"], f"PyPI, because {cpu_index} cannot be reached (larger, and runs on the CPU too)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the choice and the command; install nothing")
    args = parser.parse_args(argv)
    installed = _installed_version()
    if installed:
        print(f"install_torch: torch {installed} is already installed; keeping it (pip uninstall torch to change)")
        return 0
    requested = os.environ.get("TORCH_VARIANT", "").strip().lower()
    if requested and requested not in VARIANTS:
        print(f"install_torch: TORCH_VARIANT={requested!r}; use one of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    variant, reason = (requested, "TORCH_VARIANT") if requested else detect_variant()
    command, source = install_command(variant, os.environ.get("TORCH_CPU_INDEX", CPU_INDEX))
    print(f"install_torch: the {variant} build ({reason}), from {source}; TORCH_VARIANT=cpu|cuda|rocm overrides")
    if args.dry_run:
        print(" ".join(command))
        return 0
    return subprocess.call(command)


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _succeeds(command: list[str]) -> bool:
    if shutil.which(command[0]) is None:
        return False
    try:
        return subprocess.run(command, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
