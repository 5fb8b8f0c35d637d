"""Per-key rate limits and per-key queue caps: one client cannot crowd out the others."""

from __future__ import annotations

import io

import pytest
import requests

from app import create_app
from service.local import LocalGenerationService
from tests.conftest import API_KEY, SECOND_KEY, LiveServer, serving, tiny_settings
from tests.doubles import Gated
from tests.images import png_bytes
from tests.test_generate_api import assert_error, post_generate
from tests.test_jobs import submit, wait_for

KEY, OTHER = {"x-api-key": API_KEY}, {"x-api-key": SECOND_KEY}


def preprocess(client, headers=KEY):
    data = {"image": (io.BytesIO(png_bytes()), "p.png")}
    return client.post("/preprocess", headers=headers, data=data, content_type="multipart/form-data")


def test_a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_do_not(worker, tmp_path):
    settings = tiny_settings(tmp_path, RATE_LIMIT_PER_MINUTE="3")
    client = create_app(settings, LocalGenerationService(settings, worker)).test_client()
    for _ in range(3):
        assert preprocess(client).status_code == 200
    refused = preprocess(client)
    assert_error(refused, 429, "3 per minute", "RATE_LIMIT_PER_MINUTE")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # The limit spans the endpoints that make work, and reading is never limited.
    assert_error(post_generate(client, png_bytes()), 429, "Too many requests")
    assert client.get("/ready", headers=KEY).status_code == 200
    assert preprocess(client, OTHER).status_code == 200


def test_answers_carry_the_ratelimit_headers_and_only_the_429_says_retry_after(tmp_path):
    server = LiveServer(tmp_path, RATE_LIMIT_PER_MINUTE="3", CORS_ORIGINS="https://tools.example")
    try:
        server.wait_until_healthy()

        def preprocess_live():
            return requests.post(
                f"{server.url}/preprocess", headers=KEY | {"Origin": "https://tools.example"},
                files={"image": ("p.png", png_bytes())}, verify=str(server.cert), timeout=30,
            )

        for remaining in (2, 1, 0):
            answer = preprocess_live()
            assert answer.status_code == 200
            assert "Retry-After" not in answer.headers
            assert answer.headers["RateLimit-Limit"] == "3"
            assert answer.headers["RateLimit-Remaining"] == str(remaining)
            assert 0 <= int(answer.headers["RateLimit-Reset"]) <= 60  # seconds from now, not a Unix time
            exposed = {name.strip().lower() for name in answer.headers["Access-Control-Expose-Headers"].split(",")}
            assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "retry-after"} <= exposed
        refused = preprocess_live()
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["RateLimit-Remaining"] == "0"
    finally:
        server.stop()


def test_rate_limit_zero_turns_it_off(worker, tmp_path):
    settings = tiny_settings(tmp_path, RATE_LIMIT_PER_MINUTE="0")
    client = create_app(settings, LocalGenerationService(settings, worker)).test_client()
    assert all(preprocess(client).status_code == 200 for _ in range(10))


@pytest.fixture
def capped(pipeline_runner, tmp_path):
    service = Gated(pipeline_runner)
    with serving(tiny_settings(tmp_path, QUEUE_SIZE="6"), service, max_per_owner=2) as client:
        yield client, service


def test_one_key_cannot_fill_the_queue_for_everyone(capped):
    client, service = capped
    mine = [submit(client).get_json()["id"] for _ in range(2)]
    assert service.started.wait(30)
    refused = submit(client)
    assert_error(refused, 429, "already has 2 requests queued or running", "MAX_QUEUED_PER_KEY")
    assert int(refused.headers["Retry-After"]) >= 1
    assert_error(post_generate(client, png_bytes()), 429, "MAX_QUEUED_PER_KEY")
    theirs = submit(client, headers=OTHER)
    assert theirs.status_code == 202
    service.open()
    for job_id in mine:
        wait_for(client, job_id, "succeeded")
    wait_for(client, theirs.get_json()["id"], "succeeded", headers=OTHER)
    # Once the key's work is done, it may queue again.
    assert submit(client).status_code == 202


CORRUPT_PNG = png_bytes()[:200]  # decoding it would answer 415


def test_a_key_over_its_share_is_refused_before_its_upload_is_decoded(capped):
    client, service = capped
    for _ in range(2):
        assert submit(client).status_code == 202
    assert service.started.wait(30)
    data = {"prompt": "x", "image": (io.BytesIO(CORRUPT_PNG), "p.png")}
    assert_error(client.post("/jobs", headers=KEY, data=data), 429, "MAX_QUEUED_PER_KEY")
    assert_error(post_generate(client, CORRUPT_PNG), 429, "MAX_QUEUED_PER_KEY")
    # /preprocess counts against the same share while the key's jobs wait.
    assert_error(preprocess(client), 429, "MAX_QUEUED_PER_KEY")
    assert preprocess(client, OTHER).status_code == 200


def test_a_full_queue_is_refused_before_the_upload_is_decoded(pipeline_runner, tmp_path):
    service = Gated(pipeline_runner)
    with serving(tiny_settings(tmp_path, QUEUE_SIZE="1"), service) as client:
        assert submit(client).status_code == 202
        assert service.started.wait(30)
        assert submit(client).status_code == 202
        assert_error(post_generate(client, CORRUPT_PNG, headers=OTHER), 503, "queue is full")


def test_a_generate_that_times_out_while_running_stops_and_saves_nothing(pipeline_runner, tmp_path):
    service = Gated(pipeline_runner)
    settings = tiny_settings(tmp_path, GENERATION_TIMEOUT_S="1")
    with serving(settings, service) as client:
        # The run starts and waits at the gate; its client gives up after a second.
        assert_error(post_generate(client, png_bytes(), steps="4"), 504, "GENERATION_TIMEOUT_S")
        assert service.started.is_set(), "the request was running, not queued"
        service.open()
        # It stops at its next step: the next request is served, and only its picture is saved.
        answer = post_generate(client, png_bytes(), steps="2")
        assert answer.status_code == 200
        saved = answer.headers["Content-Disposition"].split("filename=")[1]
        assert sorted(path.name for path in settings.output_dir.iterdir()) == [saved]


def test_canceled_and_timed_out_requests_give_their_queue_places_back_at_once(pipeline_runner, tmp_path):
    service = Gated(pipeline_runner)
    settings = tiny_settings(tmp_path, QUEUE_SIZE="4", GENERATION_TIMEOUT_S="1")
    with serving(settings, service, max_per_owner=2) as client:
        running = submit(client).get_json()["id"]
        assert service.started.wait(30)
        # The other key fills its share and cancels it, twice: as many places as the queue has.
        for _ in range(2):
            for job_id in [submit(client, headers=OTHER).get_json()["id"] for _ in range(2)]:
                assert client.delete(f"/jobs/{job_id}", headers=OTHER).get_json()["status"] == "canceled"
            assert client.get("/ready", headers=KEY).get_json()["queue_depth"] == 0
        queued = submit(client)
        assert queued.status_code == 202, queued.get_json()
        # A /generate that times out while waiting leaves the queue as it found it.
        assert_error(post_generate(client, png_bytes(), headers=OTHER), 504, "GENERATION_TIMEOUT_S")
        assert client.get("/ready", headers=KEY).get_json()["queue_depth"] == 1
        assert submit(client, headers=OTHER).status_code == 202
        service.open()
        for job_id in (running, queued.get_json()["id"]):
            wait_for(client, job_id, "succeeded")
