"""The synchronous image endpoints: POST /generate and POST /preprocess."""

from __future__ import annotations

import io

from flask import Blueprint, g, send_file

from web.access import rate_limited
from web.forms import read_image_form
from web.parts import get_edge_fields, get_generate_fields, get_service, get_settings

images = Blueprint("images", __name__)


@images.post("/preprocess")
@rate_limited
def preprocess():
    """Counts against the key's MAX_QUEUED_PER_KEY while it runs, like a generation."""
    service = get_service()
    with service.counted(g.owner):
        fields, upload = read_image_form(get_edge_fields(), get_settings())
        png = service.edge_map(fields, upload)
    return send_file(io.BytesIO(png), mimetype="image/png", download_name="edges.png")


@images.post("/generate")
@rate_limited
def generate():
    settings, service = get_settings(), get_service()
    # Refused before the costly reading and decoding when the key or the queue has no room.
    service.admit(g.owner)
    fields, upload = read_image_form(get_generate_fields(), settings)
    submission = service.submit(fields, upload, g.owner, g.request_id)
    g.log_fields.update(image="{}x{}".format(*submission.size), prompt_chars=len(fields.prompt))
    output = submission.wait(settings.generation_timeout_s)
    g.log_fields.update(generation_s=round(output.seconds, 3), worker=output.worker)
    response = send_file(
        io.BytesIO(output.data), mimetype=output.mimetype, as_attachment=True, download_name=output.file_name
    )
    response.headers["X-Seed"] = str(submission.seed)
    response.headers["X-Worker"] = output.worker
    return response
