"""One command for the benchmarks, in two modes; each appends its tables to docs/BENCHMARKS.md.

    python -m bench.benchmark --mode cpu   # tiny model: HTTP overhead, images/s at 1/4/8 clients, batching off/on
    python -m bench.benchmark --mode gpu   # full-size SD 1.5 (random weights): service against plain diffusers

Extra arguments (e.g. --no-record) go to every module of the mode: bench.http_overhead and
bench.throughput (cpu), bench.gpu_benchmark (gpu); run a module alone for its own options.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULES = {"cpu": ["bench.http_overhead", "bench.throughput"], "gpu": ["bench.gpu_benchmark"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODULES, required=True)
    args, extra = parser.parse_known_args()
    for module in MODULES[args.mode]:
        completed = subprocess.run([sys.executable, "-m", module, *extra], cwd=REPO_ROOT, check=False)
        if completed.returncode:
            return completed.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
