"""Keys: every route refuses bad ones, keys may be stored hashed, and no key is ever logged or echoed."""

from __future__ import annotations

import http.client
import re
import ssl
import subprocess
import sys

import pytest
import requests

from app import PUBLIC_ENDPOINTS, create_app
from stable_diffusion.settings import REPO_ROOT, SettingsError
from tests.conftest import API_KEY, SECOND_KEY, tiny_settings
from tests.images import png_bytes
from tests.test_generate_api import assert_error

BAD_KEYS = {
    "missing": None,
    "wrong": "wrong-key-0123456789",
    "empty": "",
    "10 KB": "k" * 10_240,
    "non-ASCII": "clé-🔑",
}
PLACEHOLDERS = {"job_id": "0" * 32, "name": "swagger-ui.css", "filename": "app.js"}


def routes(app) -> list[tuple[str, str, str]]:
    found = []
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda match: PLACEHOLDERS[match.group(1)], rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            found.append((rule.endpoint, method, path))
    return found


def send_raw(url: str, method: str, path: str, key: str | None) -> int:
    """Over a real TLS connection, with the key's UTF-8 bytes as they are (requests would refuse
    non-latin-1 header values)."""
    host, port = url.removeprefix("https://").split(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    connection.putrequest(method, path)
    if key is not None:
        connection.putheader("x-api-key", key.encode("utf-8"))
    connection.putheader("Content-Length", "0")
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


def test_every_route_but_the_public_ones_is_401_for_every_bad_key(live_server, app):
    tried = 0
    for endpoint, method, path in routes(app):
        for label, key in BAD_KEYS.items():
            status, body = send_raw(live_server.url, method, path, key)
            tried += 1
            if endpoint in PUBLIC_ENDPOINTS:
                assert status != 401, (endpoint, label)
            else:
                assert status == 401, (method, path, label, status)
                assert b'"error"' in body
    assert tried >= 5 * 15
    # What is public: liveness, the static page shells and the OpenAPI document (they hold no data; the pages
    # call the API with a key).
    assert PUBLIC_ENDPOINTS == {
        "operations.health", "pages.index", "pages.docs", "pages.static", "pages.swagger_asset", "pages.openapi"
    }


def test_a_key_stored_as_its_sha256_is_accepted_and_the_hash_itself_is_not(worker, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "stable_diffusion.api_keys"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    key = re.search(r"secret\): (\S+)", completed.stdout).group(1)
    entry = re.search(r"others\): (sha256:[0-9a-f]{64})", completed.stdout).group(1)
    assert key not in entry
    settings = tiny_settings(tmp_path, API_KEY=f"{entry},plain-key-123")
    client = create_app(settings, worker).test_client()
    assert client.get("/ready", headers={"x-api-key": key}).status_code == 200
    assert client.get("/ready", headers={"x-api-key": "plain-key-123"}).status_code == 200
    assert_error(client.get("/ready", headers={"x-api-key": entry}), 401, "Invalid API key")
    assert_error(client.get("/ready", headers={"x-api-key": entry.removeprefix("sha256:")}), 401, "Invalid")


def test_a_malformed_hashed_key_stops_start_up_without_echoing_it(tmp_path):
    with pytest.raises(SettingsError) as raised:
        tiny_settings(tmp_path, API_KEY="sha256:abc123,secret-neighbour")
    assert "API_KEY" in str(raised.value) and "64 hexadecimal" in str(raised.value)
    assert "secret-neighbour" not in str(raised.value) and "abc123" not in str(raised.value)


def test_no_key_appears_in_any_response_or_log(live_server):
    keys = [API_KEY, SECOND_KEY, BAD_KEYS["wrong"]]
    seen = []
    for key in keys:
        headers = {"x-api-key": key}
        for method, path, files in [
            ("GET", "/ready", None),
            ("GET", "/info", None),
            ("GET", "/metrics", None),
            ("GET", "/openapi.json", None),
            ("GET", "/jobs/nope", None),
            ("POST", "/generate", {"image": ("p.png", png_bytes())}),
            ("POST", "/generate", {"image": ("p.png", b"not an image")}),
            ("POST", "/jobs", {"image": ("p.png", png_bytes())}),
        ]:
            response = requests.request(
                method, f"{live_server.url}{path}", headers=headers, files=files,
                data={"prompt": "x"} if files else None, verify=str(live_server.cert), timeout=60,
            )
            seen.append(str(response.headers) + response.content.decode("latin-1"))
    written = [live_server.output(), (live_server.folder / "api.log").read_text()]
    for text in seen + written:
        for key in keys:
            assert key not in text
