"""How much wall time POST /generate over HTTPS adds to calling the same pipeline in-process.

Tiny model on the CPU, 256 px, 20 steps, refinement at its default. Prints a table and appends it,
with the date, machine and command, to docs/BENCHMARKS.md.

    python -m bench.http_overhead [--runs 7]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

import requests
import torch
from PIL import Image, ImageDraw

from service.fields import generate_fields_model
from service.local import model_config
from service.rendering import build_request
from service.settings import REPO_ROOT, Settings
from stable_diffusion.image_processing import DecodeLimits, decode_upload
from stable_diffusion.pipeline_initialization import load_pipelines
from stable_diffusion.pipeline_runner import PipelineRunner

KEY = "bench-key"
FIELDS = {"prompt": "a lighthouse on a cliff", "resolution": "256", "steps": "20", "seed": "1"}


def picture(width: int = 384, height: int = 256) -> bytes:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, 200, 200), outline="black", width=4)
    draw.ellipse((150, 60, 340, 230), outline="black", width=4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def live_server(environment: dict[str, str], port: int) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=REPO_ROOT, env=os.environ | environment,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", verify=environment["TLS_CERT_FILE"], timeout=2).ok:
                    break
            except (requests.ConnectionError, OSError):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def measure(environment: dict[str, str], port: int, upload: bytes, runs: int) -> tuple[list[float], list[float]]:
    """Time the pipeline alone and the whole request, alternating, so drift in the machine's speed
    (other tenants, turbo) falls on both sides alike.

    In-process: the edge map prepared beforehand, only `PipelineRunner.run` timed. Over HTTPS: upload,
    decoding, edges, queue, generation, PNG, files, TLS. Each side gets one warm-up first.
    """
    settings = Settings.load(env_file=None, environ=environment)
    service = PipelineRunner(load_pipelines(model_config(settings)))
    fields = generate_fields_model(settings).model_validate(FIELDS)
    request = build_request("bench", fields, decode_upload(upload, DecodeLimits(10**8, 1)))

    with live_server(environment, port) as url, requests.Session() as session:
        def over_https() -> None:
            response = session.post(
                f"{url}/generate", headers={"x-api-key": KEY}, files={"image": ("p.png", upload)},
                data=FIELDS, verify=environment["TLS_CERT_FILE"], timeout=300,
            )
            response.raise_for_status()

        service.run(request)
        over_https()
        in_process, https = [], []
        for _ in range(runs):
            in_process.append(timed(lambda: service.run(request)))
            https.append(timed(over_https))
    return in_process, https


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def server_environment(folder: str, port: int, **extra: str) -> dict[str, str]:
    """The settings of a tiny-model server on the CPU whose files all live under `folder`."""
    return {
        "SD_ENV_FILE": "", "API_KEY": KEY, "SD_MODEL": "tiny", "DEVICE": "cpu",
        "SERVER_IP": "127.0.0.1", "SERVER_PORT": str(port),
        "INPUT_DIR": f"{folder}/in", "OUTPUT_DIR": f"{folder}/out", "LOG_FILE": f"{folder}/api.log",
        "TLS_CERT_FILE": f"{folder}/cert.pem", "TLS_KEY_FILE": f"{folder}/key.pem",
        "JOBS_DB": f"{folder}/jobs.sqlite3",
    } | extra


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()

    upload = picture()
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        environment = server_environment(folder, port)
        in_process, over_https = measure(environment, port, upload, args.runs)

    pipeline_s, http_s = statistics.median(in_process), statistics.median(over_https)
    overhead = http_s / pipeline_s - 1
    # Each request against the in-process run just before it: drift between pairs cancels out.
    paired = statistics.median(h / i for h, i in zip(over_https, in_process, strict=True)) - 1
    table = "\n".join(
        [
            "| path | median s | min s | max s |",
            "|---|---|---|---|",
            f"| pipeline in-process | {pipeline_s:.3f} | {min(in_process):.3f} | {max(in_process):.3f} |",
            f"| POST /generate over HTTPS | {http_s:.3f} | {min(over_https):.3f} | {max(over_https):.3f} |",
            "",
            f"HTTP overhead: **{overhead:+.1%}** from the medians, **{paired:+.1%}** as the median of "
            "the paired ratios (target: at most +10%)",
        ]
    )
    print(table)
    if not args.no_record:
        record(table, args.runs)


def record(table: str, runs: int) -> None:
    work = (
        "384x256 PNG upload, resolution 256, 20 steps, refinement 0.3, seed 1; "
        f"{runs} timed runs of each, alternating, after one warm-up each"
    )
    record_entry("HTTP overhead, tiny model on CPU", f"python -m bench.http_overhead --runs {runs}", work, table)


def machine_line() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def record_entry(title: str, command: str, work: str, table: str) -> None:
    """Append a dated entry to docs/BENCHMARKS.md."""
    entry = (
        f"\n## {title}: {date.today().isoformat()}\n\n"
        f"- Command: `{command}`\n- Machine: {machine_line()}\n- Work: {work}\n\n{table}\n"
    )
    path = REPO_ROOT / "docs" / "BENCHMARKS.md"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Benchmarks\n\nEvery entry says the command, the machine and the date it was measured.\n")
    with path.open("a") as handle:
        handle.write(entry)


if __name__ == "__main__":
    main()
