"""One command for the benchmarks, in two modes; each appends its tables to docs/BENCHMARKS.md.

    python bench/benchmark.py --mode cpu   # tiny model: HTTP overhead, images/s at 1/4/8 clients, batching off/on
    python bench/benchmark.py --mode gpu   # full-size SD 1.5 (random weights): service against plain diffusers

Extra arguments (e.g. --no-record) go to every script of the mode: http_overhead.py and
throughput.py (cpu), gpu_benchmark.py (gpu); run a script alone for its own options.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"cpu": ["http_overhead.py", "throughput.py"], "gpu": ["gpu_benchmark.py"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=SCRIPTS, required=True)
    args, extra = parser.parse_known_args()
    for script in SCRIPTS[args.mode]:
        completed = subprocess.run([sys.executable, str(HERE / script), *extra], check=False)
        if completed.returncode:
            return completed.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
