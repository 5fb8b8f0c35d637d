"""Pages for people: the generation page at /, the interactive API docs at /docs, and /openapi.json.

The pages and the OpenAPI document hold no data, so they are served without a key (Swagger UI must read
the document before anyone can enter a key in its Authorize dialog); everything else they show comes from
the API, called with the key the person types in.
"""

from __future__ import annotations

import swagger_ui_bundle
from flask import Blueprint, current_app, jsonify, send_from_directory

from web.openapi import build_document

pages = Blueprint("pages", __name__, static_folder="static", static_url_path="/static")
PUBLIC_ENDPOINTS = {
    "pages.index", "pages.docs", "pages.static", "pages.swagger_asset", "pages.openapi", "pages.favicon"
}
SWAGGER_ASSETS = {"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png"}


@pages.get("/")
def index():
    return pages.send_static_file("index.html")


@pages.get("/docs")
def docs():
    return pages.send_static_file("docs.html")


@pages.get("/docs/assets/<name>")
def swagger_asset(name: str):
    if name not in SWAGGER_ASSETS:
        return jsonify(error=f"No asset {name!r}."), 404
    return send_from_directory(swagger_ui_bundle.swagger_ui_path, name)


@pages.get("/favicon.ico")
def favicon():
    """Browsers ask for it on every page; without it each visit logs a 401."""
    return send_from_directory(swagger_ui_bundle.swagger_ui_path, "favicon-32x32.png", mimetype="image/png")


@pages.get("/openapi.json")
def openapi():
    return jsonify(build_document(current_app))
