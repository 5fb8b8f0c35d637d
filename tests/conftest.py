"""Fixtures: settings for the tiny model, one loaded pipeline per test run, apps and a live server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient

from app import create_app
from service.local import LocalGenerationService, model_config
from service.settings import REPO_ROOT, Settings
from service.worker import GenerationWorker
from stable_diffusion.pipeline_initialization import build_tiny_pipeline, load_pipelines
from stable_diffusion.pipeline_runner import PipelineRunner
from tests.doubles import Gated
from tests.model_files import write_kohya_lora

API_KEY = "test-key-0123456789abcdef"
SECOND_KEY = "second-key-fedcba9876543210"
# Small and quick: the tiny model at 64 px with 4 steps generates in a fraction of a second on a CPU.
FAST = {"DEFAULT_RESOLUTION": "64", "DEFAULT_STEPS": "4"}


def tiny_environment(folder: Path, **overrides: str) -> dict[str, str]:
    """The environment variables of a tiny-model service whose files all live under `folder`."""
    return {
        # Never the user's .env: its settings (a hub model, say) would change what the tests run.
        "SD_ENV_FILE": "",
        "API_KEY": f"{API_KEY},{SECOND_KEY}",
        "SD_MODEL": "tiny",
        "DEVICE": "cpu",
        "INPUT_DIR": str(folder / "input_images"),
        "OUTPUT_DIR": str(folder / "output_images"),
        "LOG_FILE": str(folder / "api.log"),
        "JOBS_DB": str(folder / "jobs.sqlite3"),
        "TLS_CERT_FILE": str(folder / "ssl_cert" / "cert.pem"),
        "TLS_KEY_FILE": str(folder / "ssl_cert" / "key.pem"),
        **FAST,
        **overrides,
    }


def tiny_settings(folder: Path, **overrides: str) -> Settings:
    return Settings.load(env_file=None, environ=tiny_environment(folder, **overrides))


@contextmanager
def serving(settings: Settings, service: PipelineRunner, **worker_options) -> Iterator[FlaskClient]:
    """A test client of an app whose worker runs `service`. On the way out a Gated service's gate is
    opened, so that the worker can finish its queue and stop."""
    worker = GenerationWorker(lambda: service, settings.queue_size, **worker_options)
    try:
        yield create_app(settings, LocalGenerationService(settings, worker)).test_client()
    finally:
        if isinstance(service, Gated):
            service.open()
        worker.close(timeout=60)


# Not the repository's files: where tools keep their own state.
_TOOL_FOLDERS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def _repository_files() -> set[Path]:
    files = set()
    for folder, subfolders, names in os.walk(REPO_ROOT):
        subfolders[:] = [name for name in subfolders if name not in _TOOL_FOLDERS]
        files.update(Path(folder, name).relative_to(REPO_ROOT) for name in names)
    return files


@pytest.fixture(scope="session", autouse=True)
def repository_left_as_it_was():
    """The tests' servers keep every file under a temporary folder: none lands in the user's checkout."""
    before = _repository_files()
    yield
    added = sorted(map(str, _repository_files() - before))
    assert not added, f"the tests wrote into the repository: {added}"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tiny_settings(tmp_path)


@pytest.fixture(scope="session")
def pipeline_runner(tmp_path_factory) -> PipelineRunner:
    folder = tmp_path_factory.mktemp("session")
    return PipelineRunner(load_pipelines(model_config(tiny_settings(folder))))


@pytest.fixture
def worker(pipeline_runner: PipelineRunner, settings: Settings):
    worker = GenerationWorker(lambda: pipeline_runner, settings.queue_size)
    yield worker
    worker.close(timeout=60)


@pytest.fixture
def app(settings: Settings, worker: GenerationWorker):
    return create_app(settings, LocalGenerationService(settings, worker))


@pytest.fixture
def client(app):
    return app.test_client()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """`python app.py` in its own process, as a user starts it."""

    def __init__(self, folder: Path, **overrides: str) -> None:
        self.folder = folder
        self.port = free_port()
        address = {"SERVER_IP": "127.0.0.1", "SERVER_PORT": str(self.port)}
        self.environment = tiny_environment(folder, **address | overrides)
        self.url = f"https://127.0.0.1:{self.port}"
        self.cert = folder / "ssl_cert" / "cert.pem"
        self.log = (folder / "server.out").open("wb")
        env = {key: value for key, value in os.environ.items() if key != "API_KEY"} | self.environment
        self.process = subprocess.Popen(
            [sys.executable, "app.py"],
            cwd=REPO_ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until_healthy(self, timeout: float = 120) -> None:
        """Until /ready answers 200: listening, with the model loaded (it loads after /health is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                # Verified against the served certificate: up means a client can complete a handshake.
                verify = str(self.cert) if self.url.startswith("https") else False
                if requests.get(f"{self.url}/ready", headers={"x-api-key": API_KEY}, verify=verify, timeout=2).ok:
                    # What start-up printed, before any test's requests add to it.
                    self.start_up_output = self.output()
                    return
            except OSError:  # not listening yet, or (failing the test) no usable certificate
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server did not become healthy: {self.output()}")

    def output(self) -> str:
        return (self.folder / "server.out").read_text(errors="replace")

    def kill(self) -> None:
        """A crash: every process of the server gone at once, with no chance to clean up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        self.log.close()

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=60)
        finally:
            self.log.close()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """One default server for the whole run (each start costs about 10 s). Tests that change settings,
    count files or stop the server start their own. No rate limit: modules in a row would share its minute."""
    server = LiveServer(tmp_path_factory.mktemp("live"), RATE_LIMIT_PER_MINUTE="0")
    server.wait_until_healthy()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def lora_server(tmp_path_factory):
    """A default server whose LORA_DIR holds two LoRAs, ink and paper: what the page's picker and the client's
    --lora are tried on (test_own_models.py tries the LoRAs themselves)."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = build_tiny_pipeline()
    for seed, name in enumerate(("ink", "paper"), start=1):
        write_kohya_lora(pipe.unet, pipe.text_encoder, folder / f"{name}.safetensors", seed=seed)
    server = LiveServer(tmp_path_factory.mktemp("lora-server"), LORA_DIR=str(folder), RATE_LIMIT_PER_MINUTE="0")
    server.wait_until_healthy()
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter) -> None:
    from tests.figures import FIGURES

    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {value}")
