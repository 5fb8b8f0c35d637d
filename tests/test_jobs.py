"""Asynchronous jobs through the Flask app: submit, poll, events, result, cancel, retention, isolation."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from service.jobs import FINISHED
from tests.conftest import API_KEY, SECOND_KEY, serving, tiny_settings
from tests.doubles import Gated
from tests.images import png_bytes
from tests.test_generate_api import assert_error, files_in

KEY = {"x-api-key": API_KEY}
OTHER_KEY = {"x-api-key": SECOND_KEY}


def submit(client, headers=KEY, **fields):
    data = {"prompt": "a barn at dusk", "image": (io.BytesIO(png_bytes()), "barn.png"), **fields}
    return client.post("/jobs", headers=headers, data=data, content_type="multipart/form-data")


def wait_for(client, job_id: str, *statuses: str, headers=KEY, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=headers).get_json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stayed {job['status']}, never {statuses}")


def read_events(client, job_id: str, headers=KEY) -> list[tuple[str, dict]]:
    response = client.get(f"/jobs/{job_id}/events", headers=headers)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    events = []
    for block in response.get_data(as_text=True).split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.fixture
def gated(pipeline_runner, settings):
    """An app whose worker holds every run at its start until the test opens the gate."""
    service = Gated(pipeline_runner)
    with serving(settings, service) as client:
        yield client, service


def test_submit_answers_202_with_the_links(client):
    response = submit(client, seed="7")
    assert response.status_code == 202
    job = response.get_json()
    assert job["status"] in ("queued", "running")
    # Always there, so a client can read it; null when the worker took the job at once.
    assert "queue_position" in job and job["queue_position"] in (0, None)
    assert job["seed"] == 7
    assert response.headers["Location"] == job["status_url"] == f"/jobs/{job['id']}"
    assert job["result_url"] == f"/jobs/{job['id']}/result"
    assert job["events_url"] == f"/jobs/{job['id']}/events"
    wait_for(client, job["id"], "succeeded")


def test_a_job_runs_to_succeeded_and_its_result_is_the_png(client, settings):
    job_id = submit(client).get_json()["id"]
    job = wait_for(client, job_id, "succeeded")
    assert job["progress"]["step"] == job["progress"]["total"] > 0
    assert job["started_at"] <= job["finished_at"] and job["created_at"] <= job["started_at"]
    assert job["result_type"] == "image/png"
    response = client.get(job["result_url"], headers=KEY)
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert Image.open(io.BytesIO(response.data)).size == (64, 48)
    assert len(files_in(settings.output_dir)) == 1 and len(files_in(settings.input_dir)) == 1


def test_result_before_the_end_is_409_and_queued_jobs_show_their_position(gated):
    client, service = gated
    first = submit(client).get_json()["id"]
    second = submit(client).get_json()["id"]
    assert service.started.wait(30)
    running = wait_for(client, first, "running")
    assert running["progress"]["step"] == 0 and running["queue_position"] is None
    waiting = client.get(f"/jobs/{second}", headers=KEY).get_json()
    assert waiting["status"] == "queued" and waiting["queue_position"] == 0
    assert_error(client.get(f"/jobs/{first}/result", headers=KEY), 409, "running", "events")
    assert_error(client.get(f"/jobs/{second}/result", headers=KEY), 409, "queued")
    service.open()
    assert wait_for(client, second, "succeeded")["queue_position"] is None


def test_events_arrive_in_order_and_the_stream_ends_with_the_job(client):
    job_id = submit(client, steps="6").get_json()["id"]
    events = read_events(client, job_id)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "status" and kinds[-1] == "status"
    statuses = [data["status"] for kind, data in events if kind == "status"]
    assert statuses[-1] == "succeeded"
    assert statuses == sorted(statuses, key=["queued", "running", "succeeded"].index)
    steps = [data["step"] for kind, data in events if kind == "progress"]
    assert steps == sorted(steps) and steps, kinds
    previews = [data for kind, data in events if kind == "preview"]
    assert previews, "the first step's preview is always sent"
    preview = Image.open(io.BytesIO(__import__("base64").b64decode(previews[0]["image"].split(",", 1)[1])))
    assert preview.format == "PNG" and max(preview.size) <= 256
    # A finished job's stream is just its final status.
    assert read_events(client, job_id) == [("status", events[-1][1])]


def test_previews_come_at_most_once_a_second(client):
    job_id = submit(client, steps="40", resolution="256").get_json()["id"]
    started = time.monotonic()
    events = read_events(client, job_id)
    elapsed = time.monotonic() - started
    previews = [kind for kind, _ in events if kind == "preview"]
    assert 1 <= len(previews) <= elapsed + 1


def test_canceling_a_queued_job_means_it_never_runs(gated, settings):
    client, service = gated
    first = submit(client).get_json()["id"]
    second = submit(client).get_json()["id"]
    assert service.started.wait(30)
    response = client.delete(f"/jobs/{second}", headers=KEY)
    assert response.status_code == 200
    assert response.get_json()["status"] == "canceled"
    service.open()
    wait_for(client, first, "succeeded")
    job = wait_for(client, second, "canceled")
    assert job["progress"]["step"] == 0 and job["started_at"] is None
    assert_error(client.get(f"/jobs/{second}/result", headers=KEY), 409, "canceled")
    assert_error(client.delete(f"/jobs/{second}", headers=KEY), 409, "nothing to cancel")
    assert len(files_in(settings.output_dir)) == 1


def test_canceling_a_running_job_stops_it_at_its_next_step(client):
    job_id = submit(client, steps="100", resolution="256").get_json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/jobs/{job_id}", headers=KEY).get_json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    response = client.delete(f"/jobs/{job_id}", headers=KEY)
    assert response.status_code in (200, 202)
    job = wait_for(client, job_id, "canceled", timeout=10)
    assert 1 <= job["progress"]["step"] < job["progress"]["total"]
    assert "Canceled" in job["error"]
    # The worker is free again.
    wait_for(client, submit(client).get_json()["id"], "succeeded")


def test_a_key_canceling_its_job_leaves_the_other_keys_job_in_the_same_batch_succeeding(pipeline_runner, settings):
    service = Gated(pipeline_runner)
    with serving(settings, service, max_batch=2, batch_wait_s=5) as client:
        # One batch: their job refines, mine does not; theirs is held before its first step.
        theirs = submit(client, headers=OTHER_KEY, refine_strength="0.5").get_json()["id"]
        mine = submit(client, refine_strength="0").get_json()["id"]
        assert service.started.wait(30)
        canceled = client.delete(f"/jobs/{theirs}", headers=OTHER_KEY)
        assert canceled.get_json()["status"] == "running"
        service.open()
        assert wait_for(client, theirs, *FINISHED, headers=OTHER_KEY)["status"] == "canceled"
        job = wait_for(client, mine, *FINISHED)
        assert job["status"] == "succeeded", job
        response = client.get(f"/jobs/{mine}/result", headers=KEY)
        assert response.mimetype == "image/png" and Image.open(io.BytesIO(response.data)).size == (64, 48)


def test_a_full_queue_answers_503_with_retry_after(pipeline_runner, tmp_path):
    service = Gated(pipeline_runner)
    with serving(tiny_settings(tmp_path, QUEUE_SIZE="1"), service) as client:
        running = submit(client).get_json()["id"]
        assert service.started.wait(30)
        queued = submit(client).get_json()["id"]
        refused = submit(client)
        assert_error(refused, 503, "queue is full")
        assert int(refused.headers["Retry-After"]) >= 1
        service.open()
        for job_id in (running, queued):
            wait_for(client, job_id, "succeeded")


def test_a_key_sees_only_its_own_jobs(client):
    job_id = submit(client).get_json()["id"]
    wait_for(client, job_id, "succeeded")
    for method, path in [
        ("get", f"/jobs/{job_id}"),
        ("get", f"/jobs/{job_id}/result"),
        ("get", f"/jobs/{job_id}/events"),
        ("delete", f"/jobs/{job_id}"),
    ]:
        assert_error(getattr(client, method)(path, headers=OTHER_KEY), 404, "No job")
    assert client.get(f"/jobs/{job_id}", headers=KEY).status_code == 200


def test_unknown_jobs_are_404(client):
    for path in ("/jobs/nope", "/jobs/nope/result", "/jobs/nope/events"):
        assert_error(client.get(path, headers=KEY), 404, "No job")
    assert_error(client.delete("/jobs/nope", headers=KEY), 404, "No job")


def test_a_result_whose_file_is_gone_is_410_json(client, settings):
    job_id = submit(client).get_json()["id"]
    wait_for(client, job_id, "succeeded")
    (result_file,) = settings.output_dir.iterdir()
    result_file.unlink()  # as the retention janitor, or an operator, would
    response = client.get(f"/jobs/{job_id}/result", headers=KEY)
    assert_error(response, 410, "result file is gone", "JOB_RETENTION_S", "submit the job again")
    assert response.headers["Cache-Control"] == "private, no-store"
    assert client.get(f"/jobs/{job_id}", headers=KEY).get_json()["status"] == "succeeded"


def test_a_bad_job_is_refused_before_anything_is_queued_or_written(client, settings):
    assert_error(submit(client, steps="0"), 400, "steps")
    assert_error(submit(client, prompt=""), 400, "prompt")
    assert files_in(settings.input_dir) == [] and files_in(settings.output_dir) == []


def test_finished_jobs_and_their_files_go_after_the_retention_period(pipeline_runner, tmp_path):
    settings = tiny_settings(tmp_path, JOB_RETENTION_S="1")
    with serving(settings, pipeline_runner) as client:
        job_id = submit(client).get_json()["id"]
        wait_for(client, job_id, "succeeded")
        assert len(files_in(settings.output_dir)) == 1
        deadline = time.monotonic() + 10
        while client.get(f"/jobs/{job_id}", headers=KEY).status_code != 404:
            assert time.monotonic() < deadline, "the job outlived its retention period"
            time.sleep(0.1)
        # The record goes first, its files a moment after (a job is never listed without them).
        while files_in(settings.output_dir) or files_in(settings.input_dir):
            assert time.monotonic() < deadline, (files_in(settings.output_dir), files_in(settings.input_dir))
            time.sleep(0.1)
