"""Overload: ten times more concurrent clients than the queue holds. Every request ends in a picture or
a 503 with Retry-After, none hangs, and the server's memory stays bounded."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.conftest import API_KEY, LiveServer
from tests.figures import record
from tests.images import png_bytes

QUEUE_SIZE = 2
CLIENTS = 10 * QUEUE_SIZE * 2  # ten times what waiting and running together hold
REQUESTS_PER_CLIENT = 3
TIMEOUT_S = 120


def resident_mb(parent: int) -> float:
    """Memory of the server: the gunicorn master and its worker process."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            if pid == parent or int(fields[1]) == parent:
                status = (stat.parent / "status").read_text()
                total += int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024
        except (OSError, StopIteration, ValueError):
            continue
    return total


def test_ten_times_the_queue_gets_pictures_or_503s_and_nothing_hangs(tmp_path):
    server = LiveServer(tmp_path, QUEUE_SIZE=str(QUEUE_SIZE), MAX_QUEUED_PER_KEY="1000", RATE_LIMIT_PER_MINUTE="0")
    try:
        server.wait_until_healthy()
        upload = png_bytes()

        def one_client(_) -> list[tuple[int, float, str | None]]:
            answers = []
            with requests.Session() as session:
                for _ in range(REQUESTS_PER_CLIENT):
                    started = time.monotonic()
                    try:
                        response = session.post(
                            f"{server.url}/generate", headers={"x-api-key": API_KEY},
                            files={"image": ("p.png", upload)}, data={"prompt": "crowd"},
                            verify=str(server.cert), timeout=TIMEOUT_S,
                        )
                    except requests.Timeout:
                        answers.append((None, time.monotonic() - started, None))
                        continue
                    retry_after = response.headers.get("Retry-After")
                    answers.append((response.status_code, time.monotonic() - started, retry_after))
            return answers

        one_client(0)  # warm-up
        memory_before = resident_mb(server.process.pid)
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = [answer for batch in pool.map(one_client, range(CLIENTS)) for answer in batch]
        memory_after = resident_mb(server.process.pid)
    finally:
        server.stop()

    statuses = [status for status, _, _ in answers]
    hangs = statuses.count(None)
    record(load_hangs=hangs)
    assert hangs == 0 and len(answers) == CLIENTS * REQUESTS_PER_CLIENT
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= QUEUE_SIZE and statuses.count(503) > 0
    assert all(retry and int(retry) >= 1 for status, _, retry in answers if status == 503)
    latencies = sorted(seconds for _, seconds, _ in answers)
    assert latencies[-1] < TIMEOUT_S
    assert memory_after - memory_before < 300, (memory_before, memory_after)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * len(latencies)))]
    record(
        load_clients=CLIENTS,
        load_requests=len(answers),
        load_200=statuses.count(200),
        load_503=statuses.count(503),
        load_p50_ms=round(statistics.median(latencies) * 1000),
        load_p99_ms=round(p99 * 1000),
        load_memory_growth_mb=round(memory_after - memory_before),
    )
