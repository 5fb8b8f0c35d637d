"""Asynchronous jobs: submit, poll, watch as Server-Sent Events, fetch the result, cancel."""

from __future__ import annotations

import base64
import json
import uuid

from flask import Blueprint, Response, g, jsonify, send_file, stream_with_context
from pydantic import Field

from service.jobs import Job, JobEvent, JobView, describe
from web.access import rate_limited
from web.forms import read_image_form
from web.parts import get_generate_fields, get_jobs, get_service, get_settings

jobs = Blueprint("jobs", __name__)


class ShownJob(JobView):
    """A job's status and progress, and where to watch it and fetch its result."""

    status_url: str = Field(description="GET: this status; DELETE: cancel")
    result_url: str = Field(description="GET: the picture, once the job has succeeded")
    events_url: str = Field(description="GET: the job's Server-Sent Events")


def _shown(job: Job) -> dict[str, object]:
    view = describe(job, get_jobs().queue_position(job.id))
    shown = ShownJob(
        **dict(view),
        status_url=f"/jobs/{job.id}",
        result_url=f"/jobs/{job.id}/result",
        events_url=f"/jobs/{job.id}/events",
    )
    return shown.model_dump(mode="json")


@jobs.post("/jobs")
@rate_limited
def submit():
    # Refused before the costly reading and decoding when the key or the queue has no room.
    get_service().admit(g.owner)
    fields, upload = read_image_form(get_generate_fields(), get_settings())
    g.log_fields["job"] = job_id = uuid.uuid4().hex
    shown = _shown(get_jobs().submit(g.owner, job_id, fields, upload))
    return jsonify(shown), 202, {"Location": shown["status_url"]}


@jobs.get("/jobs/<job_id>")
def status(job_id: str):
    return jsonify(_shown(get_jobs().get(job_id, g.owner)))


@jobs.delete("/jobs/<job_id>")
def cancel(job_id: str):
    """200 once canceled; 202 while a running job is on its way to stopping at its next step."""
    job = get_jobs().cancel(job_id, g.owner)
    return jsonify(_shown(job)), 200 if job.finished else 202


@jobs.get("/jobs/<job_id>/result")
def result(job_id: str):
    handle, mimetype, extension = get_jobs().open_result(job_id, g.owner)
    return send_file(handle, mimetype=mimetype, as_attachment=True, download_name=f"{job_id}{extension}")


@jobs.get("/jobs/<job_id>/events")
def events(job_id: str):
    """`status` on every status change (the last one ends the stream), `progress` after steps, and
    `preview` with a small PNG of the current step at most once a second."""
    manager, owner = get_jobs(), g.owner
    manager.get(job_id, owner)  # 404 now, rather than inside the stream

    def stream():
        for event in manager.events(job_id, owner):
            yield _server_sent(event)

    headers = {"X-Accel-Buffering": "no"}
    return Response(stream_with_context(stream()), mimetype="text/event-stream", headers=headers)


def _server_sent(event: JobEvent | None) -> str:
    if event is None:
        return ": keep-alive\n\n"
    if event.kind == "preview":
        image = "data:image/png;base64," + base64.b64encode(event.preview_png).decode("ascii")
        data = {"id": event.job.id, "step": event.job.step, "total": event.job.total, "image": image}
    elif event.kind == "progress":
        data = {"id": event.job.id, "step": event.job.step, "total": event.job.total}
    else:
        data = _shown(event.job)
    return f"event: {event.kind}\ndata: {json.dumps(data)}\n\n"
