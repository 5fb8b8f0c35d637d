"""Every answer: its request id, one escaped line in api.log, and the security headers."""

from __future__ import annotations

import logging
import re
import time
import uuid
from logging.handlers import RotatingFileHandler

from flask import Flask, g, request

from service.settings import Settings

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def init_request_log(app: Flask, settings: Settings) -> None:
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


def init_security_headers(app: Flask, settings: Settings) -> None:
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
