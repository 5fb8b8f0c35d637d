"""The HTTP edge of the image generation API: assembling the app, auth, JSON errors, request log, serving."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
import uuid
from logging.handlers import RotatingFileHandler

from flask import Flask, g, jsonify, request
from flask_cors import CORS
from flask_limiter import HeaderNames, Limiter, RateLimitExceeded
from gunicorn.app.base import BaseApplication
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from service.api_keys import digest, entry_digest, matches_any
from service.fields import edge_fields_model, generate_fields_model
from service.jobs import JobManager, JobStore
from service.settings import Settings, SettingsError
from service.worker import GenerationWorker
from stable_diffusion.errors import ServiceError, Unauthorized
from stable_diffusion.image_processing import DecodeLimits, DecodeSlots, return_freed_pictures_to_the_os
from stable_diffusion.pipeline_initialization import load_pipelines
from stable_diffusion.pipeline_service import PipelineService
from web.access import is_public
from web.gunicorn_worker import worker_class
from web.images import images
from web.jobs import jobs
from web.operations import Metrics, operations
from web.pages import pages
from web.tls import CertificateError, ensure_certificate

RATE_LIMITED_ENDPOINTS = {"images.generate", "images.preprocess", "jobs.submit"}
# The IETF's RateLimit-* fields (draft-ietf-httpapi-ratelimit-headers) instead of flask-limiter's X-RateLimit-*.
# flask-limiter adds the reset moment as a Unix time, then sets the seconds until it under the name of its
# Retry-After; naming both RateLimit-Reset leaves the seconds, as the draft defines it, and keeps Retry-After,
# which means "come back later", off successful answers.
RATE_LIMIT_HEADERS = {
    HeaderNames.LIMIT: "RateLimit-Limit",
    HeaderNames.REMAINING: "RateLimit-Remaining",
    HeaderNames.RESET: "RateLimit-Reset",
    HeaderNames.RETRY_AFTER: "RateLimit-Reset",
}
# Room for the text fields beside the image in a multipart body.
FORM_OVERHEAD_BYTES = 256 * 1024
# The most of an unread body that is read and thrown away so that the client gets the answer.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
# The exit status gunicorn's arbiter reads as "the application failed to load", and stops on.
APP_LOAD_ERROR = 4
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def create_app(settings: Settings, worker: GenerationWorker | None = None) -> Flask:
    """Build the app; without `worker`, start one that loads the configured model in the background."""
    app = Flask(__name__, static_folder=None)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        MAX_FORM_MEMORY_SIZE=FORM_OVERHEAD_BYTES,
        MAX_FORM_PARTS=64,
    )
    worker = worker or start_worker(settings)
    return_freed_pictures_to_the_os()
    for directory in (settings.input_dir, settings.output_dir):
        directory.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.jobs_db)
    app.extensions.update(
        settings=settings,
        worker=worker,
        jobs=JobManager(store, worker, settings.input_dir, settings.output_dir, settings.job_retention_s),
        generate_fields=generate_fields_model(settings),
        edge_fields=edge_fields_model(settings),
        decode_limits=DecodeLimits(max_pixels=settings.max_image_pixels, max_frames=settings.max_gif_frames),
        decode_slots=DecodeSlots(settings.max_concurrent_decodes),
    )
    _init_request_log(app, settings)
    _init_security_headers(app, settings)
    _init_auth(app, settings)
    _init_rate_limit(app, settings)
    _init_errors(app)
    app.extensions["metrics"] = Metrics(app, store)
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


def start_worker(settings: Settings, on_load_failed=None) -> GenerationWorker:
    """The worker for the configured model; it loads the model on its own thread."""
    return GenerationWorker(
        lambda: PipelineService(
            load_pipelines(settings), max_batch=settings.batch_size,
            warm_up_sizes=settings.warm_up_sizes or ((settings.default_resolution,) * 2,),
        ),
        settings.queue_size,
        on_load_failed=on_load_failed,
        max_per_owner=settings.max_queued_per_key,
        max_batch=settings.batch_size,
        batch_wait_s=settings.batch_wait_ms / 1000,
    )


def _init_request_log(app: Flask, settings: Settings) -> None:
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(
        settings.log_file, maxBytes=settings.log_max_bytes, backupCount=settings.log_backups, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    # One logger object per app (not from logging's registry), so apps built in tests don't share handlers.
    request_log = logging.Logger("api", logging.INFO)
    request_log.addHandler(handler)

    @app.before_request
    def start_request() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        g.started = time.perf_counter()
        g.log_fields = {}

    @app.after_request
    def log_request(response):
        response.headers["X-Request-ID"] = g.request_id
        fields = {
            "request_id": g.request_id,
            "client": request.remote_addr,
            "method": request.method,
            "path": request.path,
            "query": request.query_string.decode("latin-1"),
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - g.started) * 1000, 1),
            "user_agent": request.headers.get("User-Agent", ""),
        } | g.log_fields
        request_log.info(" ".join(f"{key}={_log_value(value)}" for key, value in fields.items() if value != ""))
        return response


def _log_value(value: object) -> str:
    """A value as one unambiguous word of the log line: the client chooses the path (decoded, so %0D%0A is
    a real line break), the query and the headers, so without escaping it could forge whole log lines.
    Backslashes, control and non-ASCII characters become Python escapes, spaces \\x20."""
    return str(value).encode("unicode_escape").decode("ascii").replace(" ", "\\x20")


def _init_security_headers(app: Flask, settings: Settings) -> None:
    """On every answer: no MIME sniffing, no framing, scripts and styles only from this server (the page's
    previews are data: URLs, its results blob: URLs; Swagger UI sets inline styles); over TLS, HSTS, so a
    browser that has been here comes back over HTTPS only (over plain HTTP the header means nothing).
    The API's answers (pictures included) are `private, no-store`; the pages keep Flask's revalidation."""
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": CONTENT_SECURITY_POLICY}
    if settings.tls:
        headers["Strict-Transport-Security"] = "max-age=31536000"

    @app.after_request
    def add_security_headers(response):
        response.headers.update(headers)
        if request.blueprint != "pages":
            # Answers belong to one key: no shared cache may keep them, no browser may store them.
            response.headers["Cache-Control"] = "private, no-store"
        return response


def _init_auth(app: Flask, settings: Settings) -> None:
    digests = [entry_digest(entry) for entry in settings.api_keys]

    @app.before_request
    def require_api_key() -> None:
        # Browsers send CORS preflights without credentials; flask-cors answers them.
        if request.method == "OPTIONS" or is_public(app, request.endpoint):
            return
        given = request.headers.get("x-api-key")
        if given is None:
            raise Unauthorized("Missing API key: send it in the x-api-key header.")
        given_bytes = _header_bytes(given)
        if not matches_any(given_bytes, digests):
            raise Unauthorized("Invalid API key: check the x-api-key header.")
        # Jobs belong to a key; they are filed under its hash, never the key itself.
        g.owner = digest(given_bytes).hex()


def _init_rate_limit(app: Flask, settings: Settings) -> None:
    """Requests per minute per key, across the endpoints that make work; counted after auth. Answers
    within the limit carry the RateLimit-* headers; a 429 also carries Retry-After."""
    if not settings.rate_limit_per_minute:
        return
    per_minute = settings.rate_limit_per_minute

    @app.errorhandler(RateLimitExceeded)
    def refuse(error: RateLimitExceeded):
        response = error.get_response()
        response.headers["Retry-After"] = str(max(1, int(limiter.current_limit.reset_at - time.time())))
        response.data = jsonify(
            error=f"Too many requests: this API key may make {per_minute} per minute to /generate, /jobs and "
            "/preprocess (RATE_LIMIT_PER_MINUTE); retry after the number of seconds in Retry-After."
        ).get_data()
        response.content_type = "application/json"
        return response

    limiter = Limiter(
        # Preflights reach here without a key (and are exempt); everything else has passed auth.
        key_func=lambda: g.get("owner", ""),
        app=app,
        application_limits=[f"{per_minute}/minute"],
        application_limits_exempt_when=lambda: (
            request.endpoint not in RATE_LIMITED_ENDPOINTS or request.method == "OPTIONS"
        ),
        storage_uri="memory://",
        strategy="moving-window",
        headers_enabled=True,
        header_name_mapping=RATE_LIMIT_HEADERS,
    )


def _header_bytes(value: str) -> bytes:
    """WSGI hands headers over as latin-1 text; recover the bytes the client sent."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


def _init_errors(app: Flask) -> None:
    log = logging.getLogger("stable_diffusion.http")

    @app.errorhandler(ServiceError)
    def service_error(error: ServiceError):
        response = jsonify(error=error.message)
        if error.retry_after is not None:
            response.headers["Retry-After"] = str(error.retry_after)
        return response, error.status

    @app.after_request
    def read_rest_of_body(response):
        """Clients like `requests` send their whole body before reading the answer, so an answer given
        before the body is read (401, 429, 413) reaches them only once the rest is read; a body too
        large to read is answered with the connection closed."""
        if not _discard_unread_body():
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error: RequestEntityTooLarge):
        limit_mb = app.extensions["settings"].max_upload_mb
        response = jsonify(
            error=f"The request is too large: uploads are limited to {limit_mb:g} MB (MAX_UPLOAD_MB) "
            "and text fields to 256 KB; send a smaller image."
        )
        response.headers["Connection"] = "close"
        return response, 413

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        response = error.get_response()
        response.data = jsonify(error=error.description).get_data()
        response.content_type = "application/json"
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("request %s failed", g.get("request_id"))
        return jsonify(error=f"Internal server error; the server logged it under request id {g.request_id}."), 500


def _discard_unread_body() -> bool:
    """Read and drop what the app left of the request body, up to DRAIN_LIMIT_BYTES; True once it is
    all read (a body the app consumed is, at no cost)."""
    stream = request.environ.get("wsgi.input")
    remaining = DRAIN_LIMIT_BYTES
    while stream is not None and remaining > 0:
        chunk = stream.read(min(remaining, 1 << 20))
        if not chunk:
            return True
        remaining -= len(chunk)
    return stream is None


def main() -> int:
    """Serve over HTTPS with gunicorn: one worker process owning the model, threads for the clients."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
            "workers": 1,
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

    def load(self) -> Flask:
        """Runs in the worker process: answer /health at once while the model loads in the background."""
        return create_app(self.settings, start_worker(self.settings, on_load_failed=_stop_serving))


def _say_https(record: logging.LogRecord) -> bool:
    """gunicorn names its listening sockets http:// whatever they serve; over TLS, its line says https://."""
    if record.msg.startswith("Listening at:") and record.args:
        record.args = (str(record.args[0]).replace("http://", "https://"), *record.args[1:])
    return True


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
    grace = app.extensions["settings"].shutdown_grace_s
    app.extensions["worker"].close(timeout=max(1.0, grace - 5))
    app.extensions["jobs"].close()


def _stop_serving(error: Exception) -> None:
    """The model cannot load, so nothing can be served: say why in one line and stop the whole server
    (gunicorn stops instead of restarting a worker that exits with APP_LOAD_ERROR)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    os._exit(APP_LOAD_ERROR)


if __name__ == "__main__":
    sys.exit(main())
