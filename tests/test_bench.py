"""The GPU benchmark script runs end to end (on the CPU, with the tiny model), so that a session lent a
GPU can trust it to measure; what it measures is not checked here."""

from __future__ import annotations

import re
import subprocess
import sys

from service.settings import REPO_ROOT


def test_gpu_benchmark_prints_both_paths_for_both_refine_strengths():
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu_benchmark", "--model", "tiny", "--device", "cpu", "--dtype", "float32",
         "--resolution", "64", "--steps", "2", "--runs", "1", "--per-client", "1", "--compile", "off",
         "--no-record"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # The work is square (512x512 by default), whatever the picture sent.
    assert re.search(r"^device: cpu; 64x64, 2 steps;", completed.stdout, re.M), completed.stdout
    rows = re.findall(r"^\| (service \(batching, compile off\)|plain diffusers, one at a time) \| (0|0\.3) \| "
                      r"([\d.]+) \| ([\d.]+) \|", completed.stdout, re.M)
    assert sorted((path[:7], refine) for path, refine, _, _ in rows) == [
        ("plain d", "0"), ("plain d", "0.3"), ("service", "0"), ("service", "0.3")
    ]
    assert all(float(latency) > 0 and float(rate) > 0 for _, _, latency, rate in rows)
    assert len(re.findall(r"^\| speed-up at 8 clients \| (0|0\.3) \| \| [\d.]+x \|", completed.stdout, re.M)) == 2
