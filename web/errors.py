"""One place where failures become answers: every error is JSON `{"error": ...}` with its status, and a
body the app did not read is drained so that the client hears the answer."""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from service.errors import ServiceError
from web.parts import get_settings

# The most of an unread body that is read and thrown away so that the client gets the answer.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024


class Error(BaseModel):
    """Every failure's body."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="what was wrong, and how to fix it")


def error_json(message: str) -> Response:
    return jsonify(Error(error=message).model_dump())


def init_errors(app: Flask) -> None:
    log = logging.getLogger("web.errors")

    @app.errorhandler(ServiceError)
    def service_error(error: ServiceError):
        response = error_json(error.message)
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
        limit_mb = get_settings(app).max_upload_mb
        response = error_json(
            f"The request is too large: uploads are limited to {limit_mb:g} MB (MAX_UPLOAD_MB) "
            "and text fields to 256 KB; send a smaller image."
        )
        response.headers["Connection"] = "close"
        return response, 413

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        response = error.get_response()
        response.data = error_json(error.description).get_data()
        response.content_type = "application/json"
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("request %s failed", g.get("request_id"))
        return error_json(f"Internal server error; the server logged it under request id {g.request_id}."), 500


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
