"""`python -m tests.rewrite_in_place TARGET SECONDS VERSION...`: write each VERSION file over TARGET in turn for
SECONDS, as `cp` does (the same file truncated, then written again in pieces), pausing a moment between copies as
a shell loop of `cp` would; with --removing, TARGET is also removed before each copy (`rm`, then `cp`). Run as a
process of its own, so that it writes while the process under test reads."""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

PIECE = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent


def padded_versions(lora: Path, folder: Path) -> list[Path]:
    """Two versions of `lora`, each with 160 MB of padding (different bytes), written into `folder`: large
    enough that reading one takes long enough for a rewrite to land in the middle of a read."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(lora)
    versions = [folder / f"{lora.stem}-padded-{seed}.bin" for seed in (1, 2)]
    for seed, version in enumerate(versions, start=1):
        save_file(tensors | {"padding": torch.full((40_000_000,), float(seed))}, str(version))
    return versions


def start(target: Path, seconds: float, versions: list[Path], removing: bool = False) -> subprocess.Popen:
    """This script in a process of its own, writing `versions` over `target` for `seconds`."""
    command = [sys.executable, "-m", "tests.rewrite_in_place", str(target), str(seconds), *map(str, versions)]
    return subprocess.Popen(command + (["--removing"] if removing else []), cwd=REPO_ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path)
    parser.add_argument("seconds", type=float)
    parser.add_argument("versions", type=Path, nargs="+")
    parser.add_argument("--removing", action="store_true")
    arguments = parser.parse_args()
    versions = [path.read_bytes() for path in arguments.versions]
    deadline = time.monotonic() + arguments.seconds
    while time.monotonic() < deadline:
        for data in versions:
            if arguments.removing:
                arguments.target.unlink(missing_ok=True)
                time.sleep(0.01)
            with arguments.target.open("wb") as file:
                for start in range(0, len(data), PIECE):
                    file.write(data[start : start + PIECE])
            time.sleep(random.uniform(0, 0.04))


if __name__ == "__main__":
    main()
