"""The server's memory is bounded in total: many concurrent worst-case uploads (RGBA pictures at the pixel
limit, a few hundred KB each) are decoded MAX_CONCURRENT_DECODES at a time, and one key's extra requests
are refused before decoding."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import API_KEY, LiveServer
from tests.figures import FIGURES, record
from tests.images import encode

SIDE = 3000
PIXELS = SIDE * SIDE
UPLOADS = 16
DECODES = 2
# Decoding and flattening one RGBA picture takes about 9 bytes per pixel; room for DECODES of them
# and the allocator's slack, far below what UPLOADS decoded at once take.
BUDGET_MB = DECODES * 9 * PIXELS / 2**20 + 150


@pytest.fixture(scope="module")
def worst_case_png() -> bytes:
    """A uniform half-transparent picture at the pixel limit: small to send, the most to decode."""
    return encode(Image.new("RGBA", (SIDE, SIDE), (10, 20, 30, 128)))


def app_process(server: LiveServer) -> int:
    """The gunicorn worker process, which holds the app (the server's process is its arbiter)."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def upload_all(
    server: LiveServer, payload: bytes, clients: int, path: str = "/preprocess", **fields: str
) -> list[requests.Response]:
    def one(_) -> requests.Response:
        return requests.post(
            f"{server.url}{path}", headers={"x-api-key": API_KEY}, files={"image": ("big.png", payload)},
            data=fields, verify=server.cert, timeout=120,
        )

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def serve(folder: Path, **overrides: str) -> LiveServer:
    server = LiveServer(
        folder, MAX_IMAGE_PIXELS=str(PIXELS), MAX_CONCURRENT_DECODES=str(DECODES), RATE_LIMIT_PER_MINUTE="0",
        **overrides,
    )
    server.wait_until_healthy()
    return server


def peak_growth_mb(server: LiveServer, work) -> tuple[object, float]:
    """What `work()` returns, and how far the app process's memory peaked above its size before it."""
    pid = app_process(server)
    before = memory_mb(pid, "VmRSS")
    # Reset the peak to the current size, so that VmHWM says what the work cost.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    result = work()
    return result, memory_mb(pid, "VmHWM") - before


@pytest.mark.parametrize("path", ["/preprocess", "/generate"])
def test_concurrent_worst_case_uploads_stay_within_the_memory_budget(tmp_path, worst_case_png, path):
    """For /generate, slow generations (many steps) keep requests queued: a queued request holds its
    edge maps, not the decoded picture."""
    server = serve(tmp_path, MAX_QUEUED_PER_KEY=str(UPLOADS), QUEUE_SIZE=str(UPLOADS), BATCH_SIZE="1")
    fields = {"prompt": "x", "steps": "25"} if path == "/generate" else {}
    try:
        started = time.monotonic()
        answers, growth = peak_growth_mb(server, lambda: upload_all(server, worst_case_png, UPLOADS, path, **fields))
        seconds = time.monotonic() - started
    finally:
        server.stop()
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    assert all(int(answer.headers["Retry-After"]) >= 1 for answer in answers if answer.status_code == 503)
    record(memory_uploads=UPLOADS, memory_200=statuses.count(200), memory_503=statuses.count(503))
    FIGURES[f"memory_peak_growth_mb{path.replace('/', '_')}"] = round(growth)
    FIGURES[f"memory_seconds{path.replace('/', '_')}"] = round(seconds)
    FIGURES["memory_budget_mb"] = round(BUDGET_MB)
    assert growth < BUDGET_MB, (growth, BUDGET_MB)


def test_one_keys_extra_uploads_are_refused_before_decoding(tmp_path, worst_case_png):
    server = serve(tmp_path, MAX_QUEUED_PER_KEY="1")
    try:
        answers, growth = peak_growth_mb(server, lambda: upload_all(server, worst_case_png, 8))
    finally:
        server.stop()
    statuses = sorted(answer.status_code for answer in answers)
    record(memory_uploads=len(answers), memory_200=statuses.count(200), memory_429=statuses.count(429))
    assert 200 in statuses and set(statuses) <= {200, 429}, statuses
    assert all("MAX_QUEUED_PER_KEY" in answer.json()["error"] for answer in answers if answer.status_code == 429)
    assert growth < BUDGET_MB / DECODES, growth
