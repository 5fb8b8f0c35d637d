"""The image generation API's process: `create_app` puts the web layer in front of a generation service,
and `main` serves it over HTTPS with gunicorn (one worker process owning the model, threads for clients)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable

from flask import Flask
from flask_cors import CORS
from gunicorn.app.base import BaseApplication

from service.backend import build_backend
from service.fields import edge_fields_model, generate_fields_model
from service.interface import GenerationService
from service.jobs import JobManager
from service.settings import Settings, SettingsError, environment_overrides
from stable_diffusion.image_processing import return_freed_pictures_to_the_os
from stable_diffusion.lora_library import LoraLibrary
from web.access import RATE_LIMIT_HEADERS, init_auth, init_rate_limit
from web.errors import init_errors
from web.gunicorn_worker import worker_class
from web.images import images
from web.jobs import jobs
from web.operations import Metrics, operations
from web.pages import pages
from web.parts import AppParts, get_jobs, get_service, get_settings, install, install_metrics
from web.request_log import init_request_log, init_security_headers
from web.tls import CertificateError, ensure_certificate

# Room for the text fields beside the image in a multipart body.
FORM_OVERHEAD_BYTES = 256 * 1024
# The exit status gunicorn's arbiter reads as "the application failed to load", and stops on.
APP_LOAD_ERROR = 4


def create_app(
    settings: Settings,
    service: GenerationService | None = None,
    on_load_failed: Callable[[Exception], None] | None = None,
) -> Flask:
    """Build the app on the backend QUEUE_BACKEND names; without `service`, the backend's own service starts (the
    local one loads the configured model in the background, and calls `on_load_failed` if it cannot)."""
    app = Flask(__name__, static_folder=None)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        MAX_FORM_MEMORY_SIZE=FORM_OVERHEAD_BYTES,
        MAX_FORM_PARTS=64,
    )
    backend = build_backend(settings, service, on_load_failed)
    return_freed_pictures_to_the_os()
    loras = LoraLibrary(settings.lora_dir)
    install(app, AppParts(
        settings=settings,
        service=backend.service,
        jobs=JobManager(
            backend.jobs, backend.service, settings.input_dir, settings.output_dir, settings.job_retention_s
        ),
        loras=loras,
        generate_fields=generate_fields_model(settings, loras),
        edge_fields=edge_fields_model(settings),
    ))
    init_request_log(app, settings)
    init_security_headers(app, settings)
    init_auth(app, settings)
    init_rate_limit(app, settings, backend)
    init_errors(app)
    install_metrics(app, Metrics(app, backend.jobs))
    CORS(
        app,
        origins=list(settings.cors_origins),
        allow_headers=["x-api-key", "Content-Type", "X-Request-ID"],
        expose_headers=[
            "X-Request-ID", "X-Seed", "Location", "Retry-After", "Content-Disposition", *RATE_LIMIT_HEADERS.values()
        ],
        max_age=600,
    )
    for blueprint in (operations, images, jobs, pages):
        app.register_blueprint(blueprint)
    return app


def main() -> int:
    """Serve over HTTPS with gunicorn: one worker process owning the model, threads for the clients."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overridden = environment_overrides()
    if overridden:
        print(f"note: the environment sets {', '.join(overridden)}, which replaces what .env says", file=sys.stderr)
    try:
        if settings.tls and ensure_certificate(settings.tls_cert_file, settings.tls_key_file):
            print(f"created a self-signed certificate: {settings.tls_cert_file}", file=sys.stderr)
    except CertificateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    GunicornServer(settings).run()
    return 0


class GunicornServer(BaseApplication):
    """gunicorn, configured from Settings instead of its command line."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        host = _listening_address(settings.server_ip)
        options = {
            "bind": f"{host}:{settings.server_port}",
            # One process holds the model in local mode; in celery mode the GPU workers do, and web processes scale.
            "workers": settings.web_workers,
            # gthread, with TLS handshakes that wait for clients in the poller and a deadline on request heads.
            "worker_class": worker_class(settings.request_head_timeout_s),
            "threads": settings.http_threads,
            # Outlast model loading and the longest generation.
            "timeout": int(settings.generation_timeout_s) + 300,
            # On SIGTERM: stop accepting, let in-flight requests and queued work finish for this long.
            "graceful_timeout": int(settings.shutdown_grace_s),
            "worker_exit": _finish_work,
            "when_ready": lambda arbiter: print(
                f"listening on {_public_url(settings)} (the model loads in the background; /ready says when)",
                file=sys.stderr, flush=True,
            ),
            "errorlog": "-",
            "accesslog": None,
            "control_socket_disable": True,
            # Room for a long (wrong) API key to get its JSON 401 rather than gunicorn's bare 431.
            "limit_request_field_size": 32 * 1024,
        }
        if settings.tls:
            options |= {"certfile": str(settings.tls_cert_file), "keyfile": str(settings.tls_key_file)}
        for key, value in options.items():
            self.cfg.set(key, value)
        if settings.tls:
            logging.getLogger("gunicorn.error").addFilter(_say_https)
        logging.getLogger("gunicorn.error").addFilter(_AfterLoadFailureSayNothing())

    def load(self) -> Flask:
        """Runs in the worker process: answer /health at once while the model loads in the background."""
        return create_app(self.settings, on_load_failed=_stop_serving)


def _say_https(record: logging.LogRecord) -> bool:
    """gunicorn names its listening sockets http:// whatever they serve; over TLS, its line says https://."""
    if record.msg.startswith("Listening at:") and record.args:
        record.args = (str(record.args[0]).replace("http://", "https://"), *record.args[1:])
    return True


class _AfterLoadFailureSayNothing(logging.Filter):
    """Once the worker has printed why the model cannot load and exited with APP_LOAD_ERROR, the arbiter's
    own lines (the worker's exit code, "Shutting down: Master", "Reason: App failed to load.") say nothing
    more: the one line stays the last thing the user sees."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg.startswith("Worker (pid:%s) exited with code") and record.args[1:2] == (APP_LOAD_ERROR,):
            self.failed = True
        return not self.failed


def _public_url(settings: Settings) -> str:
    """Where a client on this machine reaches the server (gunicorn's own line says http:// even over TLS)."""
    scheme = "https" if settings.tls else "http"
    wildcard = settings.server_ip in ("::", "0.0.0.0")
    host = "localhost" if wildcard else f"[{settings.server_ip}]" if ":" in settings.server_ip else settings.server_ip
    return f"{scheme}://{host}:{settings.server_port}/"


def _listening_address(server_ip: str) -> str:
    """gunicorn's form of the address: `::` (every IPv6 and, on a dual-stack system, IPv4 address) falls
    back to 0.0.0.0 where the machine has no IPv6."""
    if server_ip == "::" and not _ipv6_available():
        return "0.0.0.0"
    return f"[{server_ip}]" if ":" in server_ip else server_ip


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


def _finish_work(server, worker) -> None:
    """gunicorn's last call in the worker process, once in-flight requests are answered: finish the
    generations still queued (jobs), within what is left of the grace period, and save their results."""
    app = getattr(worker, "wsgi", None)
    if not isinstance(app, Flask):
        return
    grace = get_settings(app).shutdown_grace_s
    get_service(app).close(timeout=max(1.0, grace - 5))
    get_jobs(app).close()
    # Everything is saved and closed by now. On a clean exit, Python's own finalization (unloading torch,
    # diffusers and transformers) would only add a second of CPU to every stop and restart: skip it.
    leaving = sys.exc_info()[1]
    if isinstance(leaving, SystemExit) and leaving.code in (0, None):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _stop_serving(error: Exception) -> None:
    """The model cannot load, so nothing can be served: say why, one line per setting at fault, and stop the
    whole server (gunicorn stops instead of restarting a worker that exits with APP_LOAD_ERROR)."""
    for line in str(error).splitlines():
        print(f"error: {line}", file=sys.stderr, flush=True)
    os._exit(APP_LOAD_ERROR)


if __name__ == "__main__":
    sys.exit(main())
