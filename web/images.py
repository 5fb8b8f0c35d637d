"""The synchronous image endpoints: POST /generate, POST /preprocess, and GET /info describing them."""

from __future__ import annotations

import io
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Blueprint, current_app, g, jsonify, send_file

from service.generation import build_request, render_output
from service.storage import new_file_stem, write_atomically
from stable_diffusion.errors import GenerationTimeout, ServiceError
from stable_diffusion.image_processing import FILE_EXTENSIONS, decode_upload, encode_png, make_control_image
from web.forms import read_image_form

images = Blueprint("images", __name__)


@images.get("/info")
def info():
    settings = current_app.extensions["settings"]
    return jsonify(
        current_app.extensions["worker"].service.describe()
        | {
            "fields": {
                "generate": current_app.extensions["generate_fields"].model_json_schema()["properties"],
                "preprocess": current_app.extensions["edge_fields"].model_json_schema()["properties"],
            },
            "limits": {
                "max_upload_mb": settings.max_upload_mb,
                "max_image_pixels": settings.max_image_pixels,
                "max_gif_frames": settings.max_gif_frames,
                "max_prompt_chars": settings.max_prompt_chars,
                "queue_size": settings.queue_size,
                "generation_timeout_s": settings.generation_timeout_s,
            },
        }
    )


@images.post("/preprocess")
def preprocess():
    """Counts against the key's MAX_QUEUED_PER_KEY while it runs, like a generation."""
    with current_app.extensions["worker"].counted(g.owner):
        fields, data = read_image_form(current_app.extensions["edge_fields"], current_app.extensions["settings"])
        with current_app.extensions["decode_slots"].hold():
            upload = decode_upload(data, current_app.extensions["decode_limits"])
            edges = make_control_image(upload.frames[0], fields.resolution, fields.low_threshold, fields.high_threshold)
    return send_file(io.BytesIO(encode_png(edges)), mimetype="image/png", download_name="edges.png")


@images.post("/generate")
def generate():
    settings, worker = current_app.extensions["settings"], current_app.extensions["worker"]
    # Refused before the costly decoding when the key or the queue has no room.
    worker.check_room(g.owner)
    fields, data = read_image_form(current_app.extensions["generate_fields"], settings)
    with current_app.extensions["decode_slots"].hold():
        upload = decode_upload(data, current_app.extensions["decode_limits"])
        generation = build_request(g.request_id, fields, upload)
        upload = upload.without_frames()
    g.log_fields.update(image="{}x{}".format(*generation.size), prompt_chars=len(fields.prompt))
    stem = new_file_stem()
    upload_path = settings.input_dir / f"{stem}.{FILE_EXTENSIONS[upload.format]}"
    # Saved before it is queued: a disk too full for the upload (507) costs no generation.
    write_atomically(upload_path, data)
    try:
        future = worker.submit(generation, owner=g.owner)
    except ServiceError:
        upload_path.unlink(missing_ok=True)
        raise
    try:
        result = future.result(timeout=settings.generation_timeout_s)
    except FutureTimeout:
        future.cancel()
        raise GenerationTimeout(
            f"Generation did not finish within {settings.generation_timeout_s:g} s "
            "(GENERATION_TIMEOUT_S); retry later or with fewer steps."
        ) from None
    g.log_fields["generation_s"] = round(result.seconds, 3)
    output = render_output(generation, result, upload, worker.service.model_name)
    name = f"{stem}.{output.extension}"
    write_atomically(settings.output_dir / name, output.data)
    response = send_file(io.BytesIO(output.data), mimetype=output.mimetype, as_attachment=True, download_name=name)
    response.headers["X-Seed"] = str(generation.seed)
    return response
