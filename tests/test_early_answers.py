"""Answers given before the body is read (a missing or wrong key, the rate limit) reach clients that
send their whole upload before reading, like `requests`, as JSON rather than a broken connection."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import API_KEY, SECOND_KEY, LiveServer
from tests.images import png_bytes

RATE_LIMIT = 2
LARGE_UPLOAD = b"\0" * (5 * 2**20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("early"), RATE_LIMIT_PER_MINUTE=str(RATE_LIMIT))
    server.wait_until_healthy()
    yield server
    server.stop()


def post_large(server: LiveServer, path: str, headers: dict[str, str]) -> requests.Response:
    return requests.post(
        f"{server.url}{path}", headers=headers, files={"image": ("big.png", LARGE_UPLOAD)},
        data={"prompt": "x"}, verify=server.cert, timeout=60,
    )


@pytest.mark.parametrize(
    "headers, message", [({}, "Missing API key"), ({"x-api-key": "wrong-key-0123456789"}, "Invalid API key")]
)
@pytest.mark.parametrize("path", ["/generate", "/jobs", "/preprocess"])
def test_a_bad_key_with_a_large_upload_gets_the_json_401(server, path, headers, message):
    response = post_large(server, path, headers)
    assert response.status_code == 401 and message in response.json()["error"]


def test_over_the_rate_limit_with_a_large_upload_gets_the_json_429(server):
    key = {"x-api-key": SECOND_KEY}
    for _ in range(RATE_LIMIT):
        allowed = requests.post(
            f"{server.url}/preprocess", headers=key, files={"image": ("p.png", png_bytes())},
            verify=server.cert, timeout=60,
        )
        assert allowed.status_code == 200
    refused = post_large(server, "/preprocess", key)
    assert refused.status_code == 429 and "RATE_LIMIT_PER_MINUTE" in refused.json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert requests.get(f"{server.url}/ready", headers={"x-api-key": API_KEY}, verify=server.cert, timeout=10).ok
