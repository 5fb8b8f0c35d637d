"""Pages for people: the generation page at /, the interactive API docs at /docs, and /openapi.json.

The pages and the OpenAPI document hold no data, so they are served without a key (Swagger UI must read
the document before anyone can enter a key in its Authorize dialog); everything else they show comes from
the API, called with the key the person types in.
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from flask import Blueprint, jsonify, send_from_directory

from web.access import public
from web.errors import error_json
from web.openapi import build_document
from web.parts import get_edge_fields, get_generate_fields, get_settings

pages = Blueprint("pages", __name__)
STATIC = Path(__file__).resolve().parent / "static"
SWAGGER_ASSETS = {"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png"}


@pages.get("/")
@public
def index():
    return send_from_directory(STATIC, "index.html")


@pages.get("/docs")
@public
def docs():
    return send_from_directory(STATIC, "docs.html")


@pages.get("/static/<path:filename>")
@public
def static(filename: str):
    return send_from_directory(STATIC, filename)


@pages.get("/docs/assets/<name>")
@public
def swagger_asset(name: str):
    if name not in SWAGGER_ASSETS:
        return error_json(f"No asset {name!r}."), 404
    return send_from_directory(swagger_ui_bundle.swagger_ui_path, name)


@pages.get("/favicon.ico")
@public
def favicon():
    """Browsers ask for it on every page; without it each visit logs a 401."""
    return send_from_directory(swagger_ui_bundle.swagger_ui_path, "favicon-32x32.png", mimetype="image/png")


@pages.get("/openapi.json")
@public
def openapi():
    return jsonify(build_document(get_settings(), get_generate_fields(), get_edge_fields()))
