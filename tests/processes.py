"""Real processes for the distributed tests: a redis-server and GPU workers (python -m stable_diffusion.gpu_worker)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from service.distributed.ledger import WORKERS
from service.settings import REPO_ROOT
from tests.conftest import free_port, tiny_environment
from web.tls import ensure_certificate


class RedisServer:
    """redis-server on a free loopback port, run as DEPLOY.md says: what it holds is kept in an append-only
    file in `folder`, so a restart (even after SIGKILL) loses nothing (scripts/install_redis.sh installs it).
    With `tls`, it speaks only TLS, with a self-signed certificate that clients verify (rediss://)."""

    def __init__(self, folder: Path, password: str | None = None, port: int | None = None, tls: bool = False) -> None:
        self.folder, self.port, self.password, self.tls = folder, port or free_port(), password, tls
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed: run scripts/install_redis.sh (make test does)")
        command = [executable, *PERSISTENCE, "--bind", "127.0.0.1", "--dir", str(folder)]
        if tls:
            ensure_certificate(self.certificate, folder / "redis-key.pem")
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.certificate),
                        "--tls-key-file", str(folder / "redis-key.pem"), "--tls-ca-cert-file", str(self.certificate),
                        "--tls-auth-clients", "no"]
        else:
            command += ["--port", str(self.port)]
        if password:
            command += ["--requirepass", password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    @property
    def certificate(self) -> Path:
        return self.folder / "redis-cert.pem"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.certificate}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stop(self, signal_number: int = signal.SIGTERM) -> None:
        self.process.send_signal(signal_number)
        self.process.wait(timeout=20)

    def restart(self) -> None:
        """The same address again, with what it held (its append-only file)."""
        if self.process.poll() is None:
            self.stop()
        self.__init__(self.folder, self.password, self.port, self.tls)


# DEPLOY.md's persistence settings, word for word (tests/test_distributed.py checks that it says them).
PERSISTENCE = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "")


class GpuWorker:
    """`python -m stable_diffusion.gpu_worker` on the tiny model, as an operator starts one."""

    def __init__(self, folder: Path, name: str, **overrides: str) -> None:
        self.folder, self.name = folder, name
        self.log_path = folder / f"{name}.out"
        environment = tiny_environment(folder, **overrides)
        env = {key: value for key, value in os.environ.items() if key != "API_KEY"} | environment
        env.pop("API_KEY")  # a GPU worker needs none
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stable_diffusion.gpu_worker"], cwd=REPO_ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def process_name(self) -> str:
        """What X-Worker says for a request this worker ran."""
        return f"{socket.gethostname()}:{self.process.pid}"

    def wait_until_ready(self, client: redis.Redis, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"GPU worker exited with {self.process.returncode}: {self.output()}")
            # Its own heartbeat: Celery prints "ready" before the model has loaded, and other workers beat too.
            if b'"state": "ready"' in (client.get(f"{WORKERS}{self.process_name}") or b""):
                return
            time.sleep(0.25)
        raise RuntimeError(f"GPU worker did not become ready: {self.output()}")

    def signal(self, number: int) -> None:
        os.killpg(self.process.pid, number)

    def terminate(self) -> None:
        """SIGTERM (Celery's warm shutdown), without waiting: stop() waits. Several workers told at once stop
        together."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(timeout=10)
        return self.process.returncode
