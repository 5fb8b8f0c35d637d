"""Jobs against a real `python app.py` over HTTPS: the command-line and Python client (restarts and crashes:
test_faults.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import requests
from PIL import Image

from service.settings import REPO_ROOT
from stable_diffusion.client import ApiError, Client
from tests.conftest import API_KEY, free_port
from tests.images import png_bytes
from web.tls import ensure_certificate


def wait_for(client: Client, job_id: str, done, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not done(job := client.status(job_id)):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def run_client(live_server, *arguments: str, command: str = "generate") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stable_diffusion.client", command, *arguments, "--url", live_server.url],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )


def test_the_command_line_client_saves_the_picture(live_server, tmp_path):
    (tmp_path / "in.png").write_bytes(png_bytes())
    completed = run_client(
        live_server, str(tmp_path / "in.png"), "a red door", "--key", API_KEY, "--insecure",
        "--seed", "5", "--negative", "blurry", "--sensitivity", "0.8", "-o", str(tmp_path / "out.png"),
    )
    assert completed.returncode == 0, completed.stderr
    assert "saved" in completed.stdout and "seed 5" in completed.stdout
    assert "succeeded" in completed.stderr  # the progress bar
    assert Image.open(tmp_path / "out.png").format == "PNG"


def test_the_command_line_client_takes_api_key_and_names_a_url_it_cannot_reach(live_server):
    """The README sets API_KEY, and the client reads it too; with nothing listening at the URL, one line says
    which URL it tried (a raw HTTPSConnectionPool error before). --help gives the defaults."""
    env = {name: value for name, value in os.environ.items() if name not in ("SD_API_KEY", "SD_API_URL")}
    env["API_KEY"] = API_KEY
    command = [sys.executable, "-m", "stable_diffusion.client"]
    listed = subprocess.run([*command, "models", "--url", live_server.url, "--insecure"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and listed.stdout.startswith("sd_model: tiny"), listed.stderr
    closed = f"https://127.0.0.1:{free_port()}"
    refused = subprocess.run([*command, "models", "--url", closed, "--insecure"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"error: nothing answers at {closed}: is the server running there? Pass --url or set SD_API_URL."
    )
    shown = subprocess.run([*command, "generate", "--help"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=120).stdout
    assert "$SD_API_URL, else https://127.0.0.1:5000" in " ".join(shown.split())
    assert "$SD_API_KEY, else $API_KEY" in " ".join(shown.split())


def test_the_command_line_client_reports_api_errors(live_server, tmp_path):
    (tmp_path / "in.png").write_bytes(png_bytes())
    wrong_key = run_client(live_server, str(tmp_path / "in.png"), "x", "--key", "wrong", "--insecure")
    assert wrong_key.returncode == 1 and "Invalid API key" in wrong_key.stderr
    # The error alone: no progress bar for a job that was never accepted.
    assert wrong_key.stderr.count("\n") == 1 and "step" not in wrong_key.stderr
    bad_field = run_client(live_server, str(tmp_path / "in.png"), "x", "--key", API_KEY, "--ca-cert",
                           str(live_server.cert), "--sensitivity", "9")
    assert bad_field.returncode == 1 and "sensitivity" in bad_field.stderr
    assert not list(tmp_path.glob("*.png"))[1:]  # nothing saved beside the input


def test_the_command_line_client_applies_and_lists_the_servers_loras(lora_server, tmp_path):
    (tmp_path / "in.png").write_bytes(png_bytes())
    trusted = ("--key", API_KEY, "--ca-cert", str(lora_server.cert))
    completed = run_client(
        lora_server, str(tmp_path / "in.png"), "a red door", *trusted,
        "--lora", "ink:0.8", "--lora", "paper:-1", "-o", str(tmp_path / "out.png"),
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(Image.open(tmp_path / "out.png").text["recipe"])["loras"] == "ink:0.8,paper:-1"

    listed = run_client(lora_server, *trusted, command="models")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[1] for line in listed.stdout.splitlines() if line.startswith("lora: ")] == ["ink", "paper"]

    unknown = run_client(lora_server, str(tmp_path / "in.png"), "x", *trusted, "--lora", "nope:1", "-o",
                         str(tmp_path / "nope.png"))
    assert unknown.returncode == 1
    assert "400: loras: no LoRA named 'nope'; available: ink, paper." in unknown.stderr
    assert not (tmp_path / "nope.png").exists()


def test_the_command_line_client_says_how_to_trust_the_self_signed_certificate(live_server, tmp_path):
    (tmp_path / "in.png").write_bytes(png_bytes())
    untrusted = run_client(live_server, str(tmp_path / "in.png"), "x", "--key", API_KEY)
    assert untrusted.returncode == 1
    assert untrusted.stderr.startswith("error: the server's certificate is not trusted (self-signed certificate)")
    assert "--ca-cert ssl_cert/cert.pem" in untrusted.stderr and "--insecure" in untrusted.stderr
    assert "TLS_CERT_FILE" in untrusted.stderr and "SSL_CERT_FILE" not in untrusted.stderr
    assert "Traceback" not in untrusted.stderr and "SSLError" not in untrusted.stderr
    assert untrusted.stderr.count("\n") == 1  # no progress bar before it
    ensure_certificate(tmp_path / "other.pem", tmp_path / "other-key.pem")
    wrong_cert = run_client(live_server, str(tmp_path / "in.png"), "x", "--key", API_KEY, "--ca-cert",
                            str(tmp_path / "other.pem"))
    assert wrong_cert.returncode == 1 and "does not match" in wrong_cert.stderr and "--insecure" in wrong_cert.stderr
    assert "Traceback" not in wrong_cert.stderr


def test_the_python_client_follows_the_events_and_can_cancel(live_server):
    client = Client(live_server.url, API_KEY, verify=str(live_server.cert))
    events = []
    job, picture = client.generate(png_bytes(), "wheat", on_event=lambda *event: events.append(event), seed=2)
    assert job["status"] == "succeeded" and job["seed"] == 2
    assert Image.open(io.BytesIO(picture)).size == (64, 48)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "status" and "progress" in kinds and "preview" in kinds

    long_job = client.submit(png_bytes(), "slow", steps=100, resolution=256)["id"]
    wait_for(client, long_job, lambda job: job["status"] == "running")
    client.cancel(long_job)
    assert wait_for(client, long_job, lambda job: job["status"] in ("canceled", "failed", "succeeded"))["status"] == (
        "canceled"
    )
    try:
        client.result(long_job)
    except ApiError as error:
        assert error.status == 409
    else:
        raise AssertionError("a canceled job has no result")


def test_events_over_https_need_the_key(live_server):
    response = requests.get(f"{live_server.url}/jobs/x/events", verify=str(live_server.cert), timeout=10)
    assert response.status_code == 401
