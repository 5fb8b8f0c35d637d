"""What a view allows, marked on the view itself (so renaming a view keeps its mark): answering without an
API key (`@public`), counting against the rate limit (`@rate_limited`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Flask, g, request
from flask_limiter import HeaderNames, Limiter, RateLimitExceeded

from service.api_keys import digest, entry_digest, matches_any
from service.backend import Backend
from service.errors import Unauthorized
from service.redis_connection import WEB_TIMEOUT_S
from service.settings import Settings
from web.errors import error_json

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


def public(view: Callable) -> Callable:
    """Serve this view without a key: it holds no data (pages, their files, liveness)."""
    view.is_public = True
    return view


def is_public(app: Flask, endpoint: str | None) -> bool:
    return getattr(app.view_functions.get(endpoint or ""), "is_public", False)


def public_endpoints(app: Flask) -> set[str]:
    return {endpoint for endpoint in app.view_functions if is_public(app, endpoint)}


def rate_limited(view: Callable) -> Callable:
    """Count this view's requests against the key's RATE_LIMIT_PER_MINUTE (the views that make work)."""
    view.is_rate_limited = True
    return view


def is_rate_limited(app: Flask, endpoint: str | None) -> bool:
    return getattr(app.view_functions.get(endpoint or ""), "is_rate_limited", False)


def init_auth(app: Flask, settings: Settings) -> None:
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


def init_rate_limit(app: Flask, settings: Settings, backend: Backend) -> None:
    """Requests per minute per key, across the endpoints that make work; counted after auth. Answers
    within the limit carry the RateLimit-* headers; a 429 also carries Retry-After."""
    if not settings.rate_limit_per_minute:
        return
    per_minute = settings.rate_limit_per_minute

    @app.errorhandler(RateLimitExceeded)
    def refuse(error: RateLimitExceeded):
        response = error.get_response()
        response.headers["Retry-After"] = str(max(1, int(limiter.current_limit.reset_at - time.time())))
        response.data = error_json(
            f"Too many requests: this API key may make {per_minute} per minute to /generate, /jobs and "
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
            not is_rate_limited(app, request.endpoint) or request.method == "OPTIONS"
        ),
        # Shared by every web process in celery mode, so N processes do not let N times the limit through;
        # while Redis is away each process counts alone rather than failing requests. A hung Redis costs the
        # first request its two calls here, then the service's one: all three within WEB_TIMEOUT_S * 2.
        storage_uri=backend.limiter_storage_uri,
        storage_options={"socket_timeout": WEB_TIMEOUT_S / 2, "socket_connect_timeout": WEB_TIMEOUT_S / 2}
        if backend.shared else {},
        in_memory_fallback_enabled=backend.shared,
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
