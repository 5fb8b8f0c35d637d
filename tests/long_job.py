"""A long job of the second key that keeps a live server's worker busy until it is canceled: what is sent
meanwhile waits in the queue (or is refused), however slow or loaded the machine, rather than for as long
as a slow generation happens to last."""

from __future__ import annotations

import time

import requests
from PIL import Image

from tests.conftest import SECOND_KEY, LiveServer
from tests.images import encode

SECOND = {"x-api-key": SECOND_KEY}


def start_long_job(server: LiveServer) -> str:
    """The job's id, once it runs: the most steps at 512 px, far longer than any test waits for it."""
    job = requests.post(
        f"{server.url}/jobs", headers=SECOND, files={"image": ("small.png", encode(Image.new("RGB", (64, 64))))},
        data={"prompt": "hold the worker", "steps": "100", "resolution": "512"}, verify=server.cert, timeout=30,
    ).json()["id"]
    status, deadline = f"{server.url}/jobs/{job}", time.monotonic() + 60
    while requests.get(status, headers=SECOND, verify=server.cert, timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline, "the job did not start within a minute"
        time.sleep(0.05)
    return job


def cancel_job(server: LiveServer, job: str) -> None:
    """The job stops at its next step, and the worker takes what waits in the queue."""
    requests.delete(f"{server.url}/jobs/{job}", headers=SECOND, verify=server.cert, timeout=10).raise_for_status()


def queue_depth(server: LiveServer) -> int:
    return requests.get(f"{server.url}/ready", headers=SECOND, verify=server.cert, timeout=10).json()["queue_depth"]
