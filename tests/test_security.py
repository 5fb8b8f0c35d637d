"""Keys: every route refuses bad ones, keys may be stored hashed, and no key is ever logged or echoed."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import subprocess
import sys

import pytest
import requests

from app import create_app
from service.local import LocalGenerationService
from service.settings import REPO_ROOT, SettingsError
from tests.conftest import API_KEY, SECOND_KEY, tiny_settings
from tests.figures import record
from tests.images import png_bytes
from tests.test_generate_api import assert_error
from web.access import public_endpoints

BAD_KEYS = {
    "missing": None,
    "wrong": "wrong-key-0123456789",
    "empty": "",
    "10 KB": "k" * 10_240,
    "non-ASCII": "clé-🔑",
}
PLACEHOLDERS = {"job_id": "0" * 32, "name": "swagger-ui.css", "filename": "app.js"}


def routes(app) -> list[tuple[str, str, str]]:
    """Every route with every method it answers, HEAD and OPTIONS (which Flask adds) included."""
    found = []
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda match: PLACEHOLDERS[match.group(1)], rule.rule)
        for method in sorted(rule.methods):
            found.append((rule.endpoint, method, path))
    return found


def send_raw(url: str, method: str, path: str, key: str | None, headers=()) -> tuple[int, bytes]:
    """Over a real TLS connection, with the key's UTF-8 bytes as they are (requests would refuse
    non-latin-1 header values)."""
    host, port = url.removeprefix("https://").split(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    connection.putrequest(method, path)
    if key is not None:
        connection.putheader("x-api-key", key.encode("utf-8"))
    for name, value in headers:
        connection.putheader(name, value)
    connection.putheader("Content-Length", "0")
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


def expected_without_a_key(app, endpoint: str, method: str) -> int:
    """OPTIONS is answered without a key (browsers send CORS preflights without credentials), with no
    body; the public pages and /health answer 200; everything else is 401."""
    return 200 if method == "OPTIONS" or endpoint in public_endpoints(app) else 401


def test_every_route_and_method_refuses_every_bad_key_and_public_ones_answer(live_server, app):
    tried = 0
    for endpoint, method, path in routes(app):
        for label, key in BAD_KEYS.items():
            status, body = send_raw(live_server.url, method, path, key)
            tried += 1
            assert status == expected_without_a_key(app, endpoint, method), (method, path, label, status)
            if status == 401 and method != "HEAD":
                assert b'"error"' in body
            if method in ("HEAD", "OPTIONS"):
                assert body == b"", (method, path, label)
    record(bad_key_requests=tried, bad_key_routes=len(routes(app)))
    assert {method for _, method, _ in routes(app)} >= {"GET", "POST", "DELETE", "HEAD", "OPTIONS"}
    assert tried >= 5 * 30
    # What is public: liveness, the static page shells and the OpenAPI document (they hold no data; the pages
    # call the API with a key).
    assert public_endpoints(app) == {
        "operations.health", "pages.index", "pages.docs", "pages.static", "pages.swagger_asset", "pages.openapi",
        "pages.favicon",
    }


def test_a_key_padded_with_spaces_or_a_tab_is_the_key(live_server):
    """HTTP makes the spaces and tabs around a header value no part of it (RFC 9110, 5.5): gunicorn, like
    any proxy on the way, strips them, so the padded key is the key. Inside the key they count."""
    for padded in (f" {API_KEY}", f"{API_KEY}  ", f"\t{API_KEY}\t"):
        assert send_raw(live_server.url, "GET", "/ready", padded)[0] == 200, repr(padded)
    for spoiled in (f"{API_KEY[:4]} {API_KEY[4:]}", f"{API_KEY}\t.", f"{API_KEY},"):
        assert send_raw(live_server.url, "GET", "/ready", spoiled)[0] == 401, repr(spoiled)


def test_a_key_stored_as_its_sha256_is_accepted_and_the_hash_itself_is_not(worker, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "service.api_keys"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    key = re.search(r"secret\): (\S+)", completed.stdout).group(1)
    entry = re.search(r"others\): (sha256:[0-9a-f]{64})", completed.stdout).group(1)
    assert key not in entry
    settings = tiny_settings(tmp_path, API_KEY=f"{entry},plain-key-123")
    client = create_app(settings, LocalGenerationService(settings, worker)).test_client()
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


def test_a_path_with_a_line_break_cannot_forge_a_log_line(live_server):
    forged = "/health%0D%0A2026-01-01%2000:00:00,000%20request_id=forged%20status=200%0A?q=%0D%0Aalso"
    request_id = "forge-attempt-1"
    status, _ = send_raw(
        live_server.url, "GET", forged, None, [("X-Request-ID", request_id), ("User-Agent", "agent\tcaf\xe9")]
    )
    assert status == 401
    lines = (live_server.folder / "api.log").read_text().splitlines()
    ours = [line for line in lines if f"request_id={request_id}" in line]
    assert len(ours) == 1, ours
    assert not any(line.startswith("2026-01-01") or "request_id=forged status" in line for line in lines)
    assert "\\r\\n2026-01-01\\x2000:00:00" in ours[0] and "query=q=%0D%0Aalso" in ours[0]
    assert "user_agent=agent\\tcaf\\xe9" in ours[0]


def test_answers_carry_the_security_and_cache_headers(live_server):
    verify = str(live_server.cert)
    page = requests.get(f"{live_server.url}/", verify=verify, timeout=10)
    policy = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy and "script-src" not in policy
    assert page.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    metrics = requests.get(f"{live_server.url}/metrics", headers={"x-api-key": API_KEY}, verify=verify, timeout=10)
    assert metrics.headers["Content-Type"].startswith("text/plain; version=")
    assert metrics.headers["Content-Type"].count("charset") == 1
    picture = requests.post(
        f"{live_server.url}/generate", headers={"x-api-key": API_KEY}, files={"image": ("p.png", png_bytes())},
        data={"prompt": "x"}, verify=verify, timeout=60,
    )
    assert picture.status_code == 200 and picture.headers["Cache-Control"] == "private, no-store"
    assert picture.headers["Strict-Transport-Security"] == "max-age=31536000"


def test_no_hsts_over_plain_http(worker, tmp_path):
    settings = tiny_settings(tmp_path, TLS="false")
    client = create_app(settings, LocalGenerationService(settings, worker)).test_client()
    answer = client.get("/health")
    assert "Strict-Transport-Security" not in answer.headers and "Content-Security-Policy" in answer.headers


def send_bytes(server, raw: bytes) -> tuple[int, dict, bytes]:
    """Raw bytes over TLS, as a broken or hostile client sends them; the answer's status, headers, body."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as plain:
        with context.wrap_socket(plain) as tls:
            tls.sendall(raw)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {name.lower(): value for name, value in headers.items()}, body


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line is too long"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40_000 + b"\r\n\r\n", 431, "headers are too large"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n", 431, "at most 100 headers"),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "Malformed HTTP request"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400, "Malformed HTTP request"),
    ],
)
def test_requests_gunicorn_refuses_get_json_errors(live_server, raw, status, words):
    answered, headers, body = send_bytes(live_server, raw)
    assert answered == status, body
    assert headers["content-type"] == "application/json"
    assert words in json.loads(body)["error"]
    assert requests.get(f"{live_server.url}/health", verify=str(live_server.cert), timeout=10).ok
    record(http_layer_refusals=1)
