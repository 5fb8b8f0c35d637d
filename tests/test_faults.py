"""Faults injected for real: a full disk, clients that hang up, and SIGTERM in the middle of work."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
import requests

from app import create_app
from service.local import LocalGenerationService
from tests.conftest import API_KEY, LiveServer, tiny_settings
from tests.figures import record
from tests.images import png_bytes
from tests.test_generate_api import assert_error, files_in, post_generate
from tests.test_jobs import submit, wait_for
from web.parts import get_jobs

KEY = {"x-api-key": API_KEY}


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KB tmpfs filled to the last byte (needs root to mount, as CI has)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder, fill(folder)
    subprocess.run(["umount", str(folder)], check=True)


def fill(folder):
    """The file that takes every byte left in `folder`'s file system."""
    filler = folder / "filler"
    try:
        with filler.open("ab") as handle:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
    except OSError:
        pass
    return filler


def images_generated(client) -> float:
    metrics = client.get("/metrics", headers=KEY).get_data(as_text=True)
    return float(re.search(r"^images_generated_total (\S+)$", metrics, re.M).group(1))


def test_a_full_disk_is_507_json_with_no_partial_file_and_then_recovers(worker, tmp_path, full_disk):
    folder, filler = full_disk
    settings = tiny_settings(tmp_path, OUTPUT_DIR=str(folder))
    client = create_app(settings, LocalGenerationService(settings, worker)).test_client()
    assert_error(post_generate(client, png_bytes()), 507, "disk is full", "Retry later")
    job = wait_for(client, submit(client).get_json()["id"], "failed")
    assert "disk is full" in job["error"]
    assert files_in(folder) == ["filler"]
    filler.unlink()
    assert post_generate(client, png_bytes()).status_code == 200
    record(faults_injected=2, faults_survived=2)


def jobs_by_status(client) -> dict[str, int]:
    metrics = client.get("/metrics", headers=KEY).get_data(as_text=True)
    return {status: int(float(count)) for status, count in re.findall(r'^jobs\{status="(\w+)"\} (\S+)$', metrics, re.M)}


def test_a_full_input_disk_is_507_before_any_generation_and_leaves_no_job(worker, tmp_path, full_disk):
    folder, filler = full_disk
    settings = tiny_settings(tmp_path, INPUT_DIR=str(folder))
    client = create_app(settings, LocalGenerationService(settings, worker)).test_client()
    assert_error(post_generate(client, png_bytes()), 507, "disk is full", folder.name)
    assert_error(submit(client), 507, "disk is full", "Retry later")
    assert files_in(folder) == ["filler"]
    filler.unlink()
    assert post_generate(client, png_bytes()).status_code == 200
    # The worker runs in order, so anything queued by the refused requests has run by now: the upload
    # is saved before the generation is queued, so nothing was, and no job was left behind.
    assert images_generated(client) == 1
    assert jobs_by_status(client) == dict.fromkeys(["queued", "running", "succeeded", "failed", "canceled"], 0)
    wait_for(client, submit(client).get_json()["id"], "succeeded")
    record(faults_injected=2, faults_survived=2)


def test_a_full_disk_under_the_jobs_database_is_507_and_recovers(worker, tmp_path, full_disk):
    folder, filler = full_disk
    filler.unlink()
    settings = tiny_settings(tmp_path, JOBS_DB=str(folder / "jobs.sqlite3"))
    client = create_app(settings, LocalGenerationService(settings, worker)).test_client()
    try:
        fill(folder)
        assert_error(submit(client), 507, "disk is full", "JOBS_DB")
        assert files_in(settings.input_dir) == [] and images_generated(client) == 0
        assert client.get("/health").status_code == 200
        filler.unlink()
        wait_for(client, submit(client).get_json()["id"], "succeeded")
    finally:
        get_jobs(client.application).close()  # lets the tmpfs be unmounted
    record(faults_injected=1, faults_survived=1)


def send_and_hang_up(server: LiveServer, body_fields: dict) -> None:
    """A whole /generate request over TLS, then the connection closed without reading the answer."""
    boundary = "hangup-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode() + png_bytes() + b"\r\n"
    ]
    for name, value in body_fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (
        f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {API_KEY}\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port)) as raw, context.wrap_socket(raw) as tls:
        tls.sendall(head + body)
        time.sleep(0.3)


def test_clients_that_hang_up_do_not_hurt_the_worker(live_server):
    server = live_server
    earlier = len(server.output())  # the server is shared: only what this test caused counts
    for _ in range(3):
        send_and_hang_up(server, {"prompt": "gone", "steps": "30", "resolution": "128"})
    events = requests.get(
        f"{server.url}/jobs/{_job(server)}/events", headers=KEY, verify=str(server.cert), stream=True, timeout=30
    )
    next(events.iter_lines())
    events.close()  # a watcher leaving mid-stream
    response = requests.post(
        f"{server.url}/generate", headers=KEY, files={"image": ("p.png", png_bytes())}, data={"prompt": "still here"},
        verify=str(server.cert), timeout=120,
    )
    assert response.status_code == 200
    assert "Traceback" not in server.output()[earlier:]
    record(faults_injected=4, faults_survived=4)


def _job(server: LiveServer) -> str:
    response = requests.post(
        f"{server.url}/jobs", headers=KEY, files={"image": ("p.png", png_bytes())},
        data={"prompt": "watched", "steps": "30", "resolution": "128"}, verify=str(server.cert), timeout=30,
    )
    return response.json()["id"]


def test_sigterm_finishes_work_in_flight_and_exits_0_and_jobs_outlive_it_and_a_crash(tmp_path):
    server = LiveServer(tmp_path, SHUTDOWN_GRACE_S="60")
    server.wait_until_healthy()
    verify = str(server.cert)
    job = requests.post(
        f"{server.url}/jobs", headers=KEY, files={"image": ("p.png", png_bytes())},
        data={"prompt": "long", "steps": "24", "resolution": "128"}, verify=verify, timeout=30,
    ).json()["id"]
    status_url = f"{server.url}/jobs/{job}"
    while requests.get(status_url, headers=KEY, verify=verify, timeout=10).json()["status"] != "running":
        time.sleep(0.05)
    answers = []
    waiting = threading.Thread(
        target=lambda: answers.append(
            requests.post(
                f"{server.url}/generate", headers=KEY, files={"image": ("p.png", png_bytes())},
                data={"prompt": "in flight", "steps": "20", "resolution": "128"}, verify=verify, timeout=120,
            )
        )
    )
    waiting.start()
    time.sleep(0.5)  # the request is in, waiting behind the job
    server.process.send_signal(signal.SIGTERM)
    refused_within = None
    for attempt in range(30):  # gunicorn's loop notices the signal within a second and closes the socket
        try:
            requests.get(f"{server.url}/health", verify=verify, timeout=0.5)
        except requests.ConnectionError:
            refused_within = attempt * 0.5
            break
        except requests.Timeout:
            pass
        time.sleep(0.5)
    assert refused_within is not None, "the server still accepted connections 15 s after SIGTERM"
    assert server.process.wait(timeout=90) == 0
    waiting.join(timeout=10)
    assert answers and answers[0].status_code == 200 and answers[0].headers["Content-Type"] == "image/png"
    server.log.close()

    # Started again on the same folders: the job finished, and so it stays. Then a crash (every process
    # SIGKILLed) in the middle of another job: the next start keeps the finished one, picture and all, and
    # says of the other that it stopped before it finished.
    again = LiveServer(tmp_path)
    try:
        again.wait_until_healthy()
        status_url = f"{again.url}/jobs/{job}"
        finished = requests.get(status_url, headers=KEY, verify=verify, timeout=10).json()
        assert finished["status"] == "succeeded", finished
        picture = requests.get(f"{status_url}/result", headers=KEY, verify=verify, timeout=10).content
        interrupted = requests.post(
            f"{again.url}/jobs", headers=KEY, files={"image": ("p.png", png_bytes())},
            data={"prompt": "a long one", "steps": "100", "resolution": "256"}, verify=verify, timeout=30,
        ).json()["id"]
        deadline = time.monotonic() + 60
        while requests.get(f"{again.url}/jobs/{interrupted}", headers=KEY, verify=verify,
                           timeout=10).json()["progress"]["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        again.kill()
    after_the_crash = LiveServer(tmp_path)
    try:
        after_the_crash.wait_until_healthy()
        url = after_the_crash.url
        assert requests.get(f"{url}/jobs/{job}", headers=KEY, verify=verify, timeout=10).json()["status"] == "succeeded"
        assert requests.get(f"{url}/jobs/{job}/result", headers=KEY, verify=verify, timeout=10).content == picture
        stopped = requests.get(f"{url}/jobs/{interrupted}", headers=KEY, verify=verify, timeout=10).json()
        assert stopped["status"] == "failed" and "stopped before this job finished" in stopped["error"], stopped
        assert stopped["finished_at"] is not None
    finally:
        after_the_crash.stop()
    record(faults_injected=2, faults_survived=2)
