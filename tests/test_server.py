"""A real `python app.py` process: HTTPS through gunicorn, the queue bound (the README's curl lines run in
test_documented_commands.py)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from service.settings import REPO_ROOT, SD15_CANNY_CONTROLNET_ID, SD15_MODEL_ID
from tests.conftest import API_KEY, LiveServer, free_port
from tests.images import png_bytes
from tests.long_job import cancel_job, queue_depth, start_long_job


def test_https_with_the_generated_certificate(live_server):
    response = requests.post(
        f"{live_server.url}/generate", headers={"x-api-key": API_KEY},
        files={"image": ("p.png", png_bytes())}, data={"prompt": "a boat"}, verify=live_server.cert, timeout=60,
    )
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_start_up_says_where_it_serves_and_prints_no_library_noise(live_server):
    output = live_server.start_up_output
    assert f"listening on https://127.0.0.1:{live_server.port}/" in output
    assert "Listening at: http://" not in output
    assert "WARNING" not in output.upper() and "torchvision" not in output and "float32: []" not in output


def test_plain_http_is_not_served(live_server):
    try:
        response = requests.get(f"http://127.0.0.1:{live_server.port}/health", timeout=10)
    except requests.ConnectionError:
        return
    assert response.status_code >= 400


def test_body_over_the_limit_is_413_json_for_requests_clients(live_server):
    response = requests.post(
        f"{live_server.url}/generate", headers={"x-api-key": API_KEY},
        files={"image": ("big.png", b"\0" * (21 * 2**20))}, data={"prompt": "x"},
        verify=live_server.cert, timeout=60,
    )
    assert response.status_code == 413
    assert "MAX_UPLOAD_MB" in response.json()["error"]
    assert requests.get(f"{live_server.url}/health", verify=live_server.cert, timeout=10).ok


def test_each_request_is_logged_to_api_log(live_server):
    requests.get(f"{live_server.url}/health", headers={"X-Request-ID": "trace-me-123"}, verify=live_server.cert)
    log = (live_server.folder / "api.log").read_text()
    assert "request_id=trace-me-123 client=127.0.0.1 method=GET path=/health status=200" in log
    assert API_KEY not in log


def test_requests_beyond_the_queue_get_503_and_the_rest_succeed(tmp_path):
    """Eight at once while another key's job holds the worker: one fits the queue, the seven beyond it are
    refused at once, and the one queued gets its picture when the worker is free."""
    server = LiveServer(tmp_path, QUEUE_SIZE="1", HTTP_THREADS="16", BATCH_SIZE="1")
    try:
        server.wait_until_healthy()
        job = start_long_job(server)

        def call(prompt: str) -> requests.Response:
            return requests.post(
                f"{server.url}/generate", headers={"x-api-key": API_KEY},
                files={"image": ("p.png", png_bytes())}, data={"prompt": prompt}, verify=server.cert, timeout=120,
            )

        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(call, "one of eight") for _ in range(8)]
            deadline = time.monotonic() + 60
            while sum(answer.done() for answer in answers) < 7 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert queue_depth(server) == 1
            cancel_job(server, job)
            answers = [answer.result() for answer in answers]
        assert sorted(response.status_code for response in answers) == [200] + [503] * 7
        for response in answers:
            if response.status_code == 503:
                assert int(response.headers["Retry-After"]) >= 1
                assert "queue is full" in response.json()["error"]
            else:
                Image.open(io.BytesIO(response.content)).verify()
        assert call("next").status_code == 200
    finally:
        assert server.stop() == 0


def test_start_up_without_api_key_says_how_to_set_it(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SD_ENV_FILE": ""}
    completed = subprocess.run(
        [sys.executable, "app.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode != 0
    assert "API_KEY is not set" in completed.stderr and ".env" in completed.stderr


def test_start_up_with_missing_weights_says_what_was_tried(tmp_path):
    server = LiveServer(tmp_path, SD_MODEL=str(tmp_path / "no-such-model"), CONTROLNET_MODEL=str(tmp_path / "no-cn"),
                        HF_HUB_OFFLINE="1")
    try:
        assert server.process.wait(timeout=120) != 0
    finally:
        server.log.close()
    output = server.output()
    assert "Could not load SD_MODEL=" in output and "SD_MODEL=tiny" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no route to the Hub"])
def test_default_model_without_a_network_fails_within_seconds_naming_the_setting(tmp_path, offline):
    hub = {"HF_HUB_OFFLINE": "1"} if offline == "HF_HUB_OFFLINE" else {"HF_HUB_OFFLINE": "0"}
    server = LiveServer(
        tmp_path, SD_MODEL=SD15_MODEL_ID, CONTROLNET_MODEL=SD15_CANNY_CONTROLNET_ID, HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", **hub,
    )
    started = time.monotonic()
    try:
        assert server.process.wait(timeout=120) != 0
    finally:
        server.log.close()
    # Starting Python and importing torch takes most of this; the Hub's retries alone took 20-40 s.
    assert time.monotonic() - started < 15
    output = server.output()
    # Each setting's own problem, one line each (#25: every model setting is checked before anything loads).
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert [line.split(": ")[1] for line in errors] == [
        f"Could not load SD_MODEL={SD15_MODEL_ID!r}", f"Could not load CONTROLNET_MODEL={SD15_CANNY_CONTROLNET_ID!r}"
    ]
    assert all("cannot be reached" in line for line in errors)
    assert "Traceback" not in output
    assert "Retrying" not in output and output.count("WARNING") == 0


def test_tls_off_serves_plain_http_for_a_terminating_proxy_on_ipv6_and_ipv4(tmp_path):
    """TLS=false (a proxy in front terminates TLS), on the address that takes both IPv6 and IPv4 (::)."""
    server = LiveServer(tmp_path, TLS="false", SERVER_IP="::")
    server.url = server.url.replace("https://", "http://")
    try:
        server.wait_until_healthy()  # over 127.0.0.1
        response = requests.post(
            f"{server.url}/generate", headers={"x-api-key": API_KEY},
            files={"image": ("p.png", png_bytes())}, data={"prompt": "a cart"}, timeout=60,
        )
        assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
        assert not (tmp_path / "ssl_cert").exists()
        ipv6 = requests.get(f"http://[::1]:{server.port}/health", timeout=10)
        assert ipv6.json() == {"status": "ok"}
    finally:
        assert server.stop() == 0
