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
from tests.long_job import cancel_job, queue_depth, start_long_job

SIDE = 3000
PIXELS = SIDE * SIDE
UPLOADS = 16
DECODES = 2
# Decoding and flattening one RGBA picture takes about 9 bytes per pixel; room for DECODES of them
# and the allocator's slack, far below what UPLOADS decoded at once take.
BUDGET_MB = DECODES * 9 * PIXELS / 2**20 + 150
# Once the worker is free, the queued requests run together; how long they take proves nothing here.
QUICK = {"prompt": "x", "steps": "1", "refine_strength": "0"}


@pytest.fixture(scope="module")
def worst_case_png() -> bytes:
    """A uniform half-transparent picture at the pixel limit: small to send, the most to decode."""
    return encode(Image.new("RGBA", (SIDE, SIDE), (10, 20, 30, 128)))


@pytest.fixture(scope="module")
def roomy_server(tmp_path_factory):
    """Room for every upload at once, in the key's share, the queue and one batch: what holds them back is
    MAX_CONCURRENT_DECODES alone. Each test measures its own peak (peak_growth_mb)."""
    server = serve(tmp_path_factory.mktemp("memory"), MAX_QUEUED_PER_KEY=str(UPLOADS), QUEUE_SIZE=str(UPLOADS),
                   BATCH_SIZE=str(UPLOADS))
    yield server
    server.stop()


def app_process(server: LiveServer) -> int:
    """The gunicorn worker process, which holds the app (the server's process is its arbiter)."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def post_upload(server: LiveServer, payload: bytes, path: str, **fields: str) -> requests.Response:
    return requests.post(
        f"{server.url}{path}", headers={"x-api-key": API_KEY}, files={"image": ("big.png", payload)},
        data=fields, verify=server.cert, timeout=120,
    )


def upload_all(server: LiveServer, payload: bytes, clients: int, path: str = "/preprocess") -> list[requests.Response]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda _: post_upload(server, payload, path), range(clients)))


def generate_all_behind(server: LiveServer, job: str, payload: bytes) -> tuple[list[requests.Response], int]:
    """UPLOADS uploads to /generate while `job` holds the worker; the job is canceled once every upload is
    queued or refused (only refusals are answered while the worker is held), and the queued ones then run
    together. Their answers, and the most that waited in the queue at once."""
    with ThreadPoolExecutor(UPLOADS) as pool:
        answers = [pool.submit(post_upload, server, payload, "/generate", **QUICK) for _ in range(UPLOADS)]
        deepest, deadline = 0, time.monotonic() + 120
        while deepest + sum(answer.done() for answer in answers) < UPLOADS and time.monotonic() < deadline:
            time.sleep(0.1)
            deepest = max(deepest, queue_depth(server))
        cancel_job(server, job)
        return [answer.result() for answer in answers], deepest


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


def test_concurrent_worst_case_uploads_to_preprocess_stay_within_the_memory_budget(roomy_server, worst_case_png):
    server = roomy_server
    started = time.monotonic()
    answers, growth = peak_growth_mb(server, lambda: upload_all(server, worst_case_png, UPLOADS))
    seconds = time.monotonic() - started
    assert_within_the_budget("/preprocess", answers, growth, seconds)


def test_concurrent_worst_case_uploads_waiting_to_generate_stay_within_the_memory_budget(roomy_server, worst_case_png):
    """A long job of another key holds the worker until every upload waits in the queue (or was refused), all
    at once: a queued request holds its edge maps, not the decoded picture."""
    server = roomy_server
    job = start_long_job(server)
    started = time.monotonic()
    (answers, deepest), growth = peak_growth_mb(server, lambda: generate_all_behind(server, job, worst_case_png))
    seconds = time.monotonic() - started
    assert_within_the_budget("/generate", answers, growth, seconds)
    assert deepest == [answer.status_code for answer in answers].count(200), deepest


def assert_within_the_budget(path: str, answers: list[requests.Response], growth: float, seconds: float) -> None:
    """Pictures or 503s with Retry-After (decoders busy, queue full), nothing else, and the peak growth of
    the server's memory under the budget."""
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
