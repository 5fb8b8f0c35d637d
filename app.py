"""The HTTP edge of the image generation API: routes, auth, request parsing, JSON errors, serving."""

from __future__ import annotations

import hmac
import io
import logging
import re
import sys
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from logging.handlers import RotatingFileHandler

from flask import Flask, g, jsonify, request, send_file
from gunicorn.app.base import BaseApplication
from gunicorn.errors import AppImportError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from stable_diffusion.errors import GenerationTimeout, InvalidField, PayloadTooLarge, ServiceError, Unauthorized
from stable_diffusion.generation import build_request, render_output
from stable_diffusion.image_processing import (
    FILE_EXTENSIONS,
    DecodeLimits,
    decode_upload,
    encode_png,
    make_control_image,
)
from stable_diffusion.pipeline_initialization import ModelLoadError, load_pipelines
from stable_diffusion.pipeline_service import PipelineService
from stable_diffusion.request_fields import edge_fields_model, generate_fields_model, parse_fields
from stable_diffusion.settings import Settings, SettingsError
from stable_diffusion.storage import new_file_stem, write_atomically
from stable_diffusion.tls import ensure_self_signed_certificate
from stable_diffusion.worker import GenerationWorker

PUBLIC_ENDPOINTS = {"health"}
# Room for the text fields beside the image in a multipart body.
FORM_OVERHEAD_BYTES = 256 * 1024
# The most of a refused body that is read and thrown away before answering 413.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def create_app(settings: Settings, worker: GenerationWorker | None = None) -> Flask:
    """Build the app; without `worker`, load the configured model and start a worker for it."""
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        MAX_FORM_MEMORY_SIZE=FORM_OVERHEAD_BYTES,
        MAX_FORM_PARTS=64,
    )
    app.extensions["settings"] = settings
    app.extensions["worker"] = worker or GenerationWorker(
        PipelineService(load_pipelines(settings)), settings.queue_size
    )
    app.extensions["generate_fields"] = generate_fields_model(settings)
    app.extensions["edge_fields"] = edge_fields_model(settings)
    for directory in (settings.input_dir, settings.output_dir):
        directory.mkdir(parents=True, exist_ok=True)
    _init_request_log(app, settings)
    _init_auth(app, settings)
    _init_errors(app)
    _init_routes(app)
    return app


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
        response.headers["X-Content-Type-Options"] = "nosniff"
        fields = {
            "request_id": g.request_id,
            "client": request.remote_addr,
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - g.started) * 1000, 1),
        } | g.log_fields
        request_log.info(" ".join(f"{key}={value}" for key, value in fields.items()))
        return response


def _init_auth(app: Flask, settings: Settings) -> None:
    keys = [key.encode("utf-8") for key in settings.api_keys]

    @app.before_request
    def require_api_key() -> None:
        if request.endpoint in PUBLIC_ENDPOINTS:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            raise Unauthorized("Missing API key: send it in the x-api-key header.")
        if not _matches_any(_header_bytes(given), keys):
            raise Unauthorized("Invalid API key: check the x-api-key header.")


def _header_bytes(value: str) -> bytes:
    """WSGI hands headers over as latin-1 text; recover the bytes the client sent."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


def _matches_any(given: bytes, keys: list[bytes]) -> bool:
    """Constant-time comparison against every key, so timing tells nothing about which one is close."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


def _init_errors(app: Flask) -> None:
    log = logging.getLogger("stable_diffusion.http")

    @app.errorhandler(ServiceError)
    def service_error(error: ServiceError):
        response = jsonify(error=error.message)
        if error.retry_after is not None:
            response.headers["Retry-After"] = str(error.retry_after)
        return response, error.status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error: RequestEntityTooLarge):
        _discard_unread_body()
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


def _discard_unread_body() -> None:
    """Read what is left of a refused body (up to a bound) so that clients which send the whole body
    before reading the answer, like `requests`, get the 413 instead of a reset connection."""
    stream = request.environ.get("wsgi.input")
    remaining = min(request.content_length or 0, DRAIN_LIMIT_BYTES)
    while stream is not None and remaining > 0 and (chunk := stream.read(min(remaining, 1 << 20))):
        remaining -= len(chunk)


def _init_routes(app: Flask) -> None:
    settings: Settings = app.extensions["settings"]
    worker: GenerationWorker = app.extensions["worker"]
    limits = DecodeLimits(max_pixels=settings.max_image_pixels, max_frames=settings.max_gif_frames)

    @app.get("/health")
    def health():
        return jsonify(status="ok")

    @app.get("/info")
    def info():
        return jsonify(
            worker.service.describe()
            | {
                "fields": {
                    "generate": app.extensions["generate_fields"].model_json_schema()["properties"],
                    "preprocess": app.extensions["edge_fields"].model_json_schema()["properties"],
                },
                "limits": {
                    "max_upload_mb": settings.max_upload_mb,
                    "max_image_pixels": settings.max_image_pixels,
                    "max_gif_frames": settings.max_gif_frames,
                    "max_prompt_chars": settings.max_prompt_chars,
                    "queue_size": settings.queue_size,
                    "generation_timeout_s": settings.generation_timeout_s,
                },
            }
        )

    @app.post("/preprocess")
    def preprocess():
        fields, data = _read_image_form(app.extensions["edge_fields"], settings)
        upload = decode_upload(data, limits)
        edges = make_control_image(upload.frames[0], fields.resolution, fields.low_threshold, fields.high_threshold)
        return send_file(io.BytesIO(encode_png(edges)), mimetype="image/png", download_name="edges.png")

    @app.post("/generate")
    def generate():
        fields, data = _read_image_form(app.extensions["generate_fields"], settings)
        upload = decode_upload(data, limits)
        generation = build_request(g.request_id, fields, upload)
        g.log_fields.update(image="{}x{}".format(*generation.size), prompt_chars=len(fields.prompt))
        future = worker.submit(generation)
        stem = new_file_stem()
        write_atomically(settings.input_dir / f"{stem}.{FILE_EXTENSIONS[upload.format]}", data)
        try:
            result = future.result(timeout=settings.generation_timeout_s)
        except FutureTimeout:
            future.cancel()
            raise GenerationTimeout(
                f"Generation did not finish within {settings.generation_timeout_s:g} s "
                "(GENERATION_TIMEOUT_S); retry later or with fewer steps."
            ) from None
        g.log_fields["generation_s"] = round(result.seconds, 3)
        output = render_output(generation, result, upload, worker.service.model_name)
        name = f"{stem}.{output.extension}"
        write_atomically(settings.output_dir / name, output.data)
        response = send_file(io.BytesIO(output.data), mimetype=output.mimetype, as_attachment=True, download_name=name)
        response.headers["X-Seed"] = str(generation.seed)
        return response


def _read_image_form(fields_model, settings: Settings):
    """The validated text fields and the raw bytes of the one `image` file of a multipart request."""
    for name in request.files:
        if name != "image":
            raise InvalidField(
                f"{name} was sent as a file; send it as a plain text field (curl -F '{name}=...')."
                if name in fields_model.model_fields
                else f"{name} is not a field of this endpoint; the only file field is image."
            )
    images = request.files.getlist("image")
    if not images:
        if "image" in request.form:
            raise InvalidField("image must be a file upload, e.g. curl -F image=@photo.png.")
        raise InvalidField(
            "image is required: send a multipart/form-data request with the picture in the field "
            "image, e.g. curl -F image=@photo.png."
        )
    values = {}
    for name in request.form:
        sent = request.form.getlist(name)
        if len(sent) > 1:
            raise InvalidField(f"{name} was sent {len(sent)} times; send it once.")
        values[name] = sent[0]
    if len(images) > 1:
        raise InvalidField(f"image was sent {len(images)} times; send one picture per request.")
    fields = parse_fields(fields_model, values)
    data = images[0].read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"image is larger than the {settings.max_upload_mb:g} MB limit (MAX_UPLOAD_MB); send a smaller file."
        )
    return fields, data


def main() -> int:
    """Serve over HTTPS with gunicorn: one worker process owning the model, threads for the clients."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.tls and ensure_self_signed_certificate(settings.ssl_cert_file, settings.ssl_key_file):
        print(f"created a self-signed certificate in {settings.ssl_cert_file.parent}", file=sys.stderr)
    GunicornServer(settings).run()
    return 0


class GunicornServer(BaseApplication):
    """gunicorn, configured from Settings instead of its command line."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        host = f"[{settings.server_ip}]" if ":" in settings.server_ip else settings.server_ip
        options = {
            "bind": f"{host}:{settings.server_port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": settings.http_threads,
            # Outlast model loading and the longest generation.
            "timeout": int(settings.generation_timeout_s) + 300,
            "graceful_timeout": 60,
            "errorlog": "-",
            "accesslog": None,
            "control_socket_disable": True,
        }
        if settings.tls:
            options |= {"certfile": str(settings.ssl_cert_file), "keyfile": str(settings.ssl_key_file)}
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        try:
            return create_app(self.settings)
        except (ModelLoadError, SettingsError) as exc:
            # gunicorn prints this message alone and stops, instead of a traceback and a restart loop.
            raise AppImportError(f"error: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
