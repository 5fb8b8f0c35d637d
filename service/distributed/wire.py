"""What travels through Redis between a web process and a GPU worker, as JSON: the request (its edge maps
as lossless PNGs, so a seed gives the same pixels in both modes), the run's events, and its output."""

from __future__ import annotations

import base64
import dataclasses
import io

from PIL import Image

from service.interface import RenderedOutput
from stable_diffusion.errors import ServiceError
from stable_diffusion.image_processing import DecodedImage, encode_png
from stable_diffusion.recipe import GenerationRequest


def request_message(request: GenerationRequest, upload: DecodedImage, owner: str, stem: str, events: bool) -> dict:
    """A Celery task's argument. `events`: someone watches the run, so previews are worth sending."""
    fields = {field.name: getattr(request, field.name) for field in dataclasses.fields(request)}
    fields["control_images"] = [_png_text(image) for image in request.control_images]
    return {
        "request": fields,
        "upload": {"format": upload.format, "durations_ms": list(upload.durations_ms), "loop": upload.loop},
        "owner": owner,
        "stem": stem,
        "events": events,
    }


def read_request(message: dict) -> tuple[GenerationRequest, DecodedImage]:
    fields = dict(message["request"])
    fields["control_images"] = tuple(_image(text) for text in fields["control_images"])
    # JSON has no tuples: the LoRA set comes back as lists, and requests batch by it, so it must hash.
    fields["loras"] = tuple((name, weight) for name, weight in fields.get("loras", ()))
    upload = message["upload"]
    decoded = DecodedImage(upload["format"], (), tuple(upload["durations_ms"]), upload["loop"])
    return GenerationRequest(**fields), decoded


def started(total: int) -> dict:
    return {"kind": "started", "total": total}


def stepped(step: int, total: int, preview: Image.Image | None) -> dict:
    return {"kind": "stepped", "step": step, "total": total, "preview": preview and _png_text(preview)}


def done(output: RenderedOutput, images: int) -> dict:
    return {
        "kind": "done", "data": base64.b64encode(output.data).decode("ascii"), "mimetype": output.mimetype,
        "file_name": output.file_name, "seconds": output.seconds, "worker": output.worker, "images": images,
    }


def failed(error: ServiceError) -> dict:
    return {
        "kind": "failed", "error": type(error).__name__, "status": error.status, "message": error.message,
        "retry_after": error.retry_after,
    }


def read_output(reply: dict) -> RenderedOutput:
    data = base64.b64decode(reply["data"])
    return RenderedOutput(data, reply["mimetype"], reply["file_name"], reply["seconds"], reply.get("worker", "unknown"))


def read_preview(reply: dict) -> Image.Image | None:
    return _image(reply["preview"]) if reply.get("preview") else None


def _png_text(image: Image.Image) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def _image(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image
