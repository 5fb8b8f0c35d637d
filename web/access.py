"""Which views answer without an API key: marked on the view itself, so renaming a view keeps its mark."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask


def public(view: Callable) -> Callable:
    """Serve this view without a key: it holds no data (pages, their files, liveness)."""
    view.is_public = True
    return view


def is_public(app: Flask, endpoint: str | None) -> bool:
    return getattr(app.view_functions.get(endpoint or ""), "is_public", False)


def public_endpoints(app: Flask) -> set[str]:
    return {endpoint for endpoint in app.view_functions if is_public(app, endpoint)}
