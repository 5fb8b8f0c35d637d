"""What travels through Redis between a web process and a GPU worker, as JSON: the request (its edge maps
as lossless PNGs, so a seed gives the same pixels in both modes) and, for a /generate request, its answer
(a job's life is recorded by the GPU worker in the job store instead). Any GPU host can write to Redis, so
what is read back is checked (types, sizes, names) before it is used: a message that fails is an
UntrustedMessage, never a path outside a folder or an unbounded allocation."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
from typing import Annotated, Literal

from PIL import Image
from pydantic import BaseModel, Field, StringConstraints, TypeAdapter, ValidationError

from service.errors import ServiceError
from service.interface import RenderedOutput
from service.storage import STEM, STORED_NAME
from stable_diffusion.errors import first_line
from stable_diffusion.image_processing import DecodedImage, encode_png
from stable_diffusion.recipe import GenerationRequest

# Bounds on what a message may carry: a result (a GIF of many frames at the largest size stays far below
# this), an error's message, an edge map's side, and the caller's recipe (prompts of
# MAX_PROMPT_CHARS, at most 100,000 each, and a few numbers).
MAX_RESULT_BYTES = 512 << 20
MAX_MESSAGE_CHARS = 2000
MAX_EDGE_MAP_SIDE = 4096
MAX_RECIPE_CHARS = 300_000


class UntrustedMessage(ValueError):
    """A message read from Redis that this service cannot have written."""


def request_message(request: GenerationRequest, upload: DecodedImage, owner: str, stem: str, job: bool) -> dict:
    """A Celery task's argument. `job`: the GPU worker records the run in the job store (a job), rather than
    answering the web process that waits (/generate)."""
    fields = {field.name: getattr(request, field.name) for field in dataclasses.fields(request)}
    fields["control_images"] = [_png_text(image) for image in request.control_images]
    return {
        "request": fields,
        "upload": {"format": upload.format, "durations_ms": list(upload.durations_ms), "loop": upload.loop},
        "owner": owner,
        "stem": stem,
        "job": job,
    }


class _Upload(BaseModel):
    format: Literal["PNG", "JPEG", "GIF"]
    durations_ms: list[Annotated[int, Field(ge=0, le=655_350)]] = Field(max_length=10_000)
    loop: int | None = Field(None, ge=0, le=65_535)


class _Task(BaseModel):
    """A task's envelope; the request's own fields are checked by the GPU worker against its settings."""

    request: dict
    upload: _Upload
    owner: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    stem: Annotated[str, StringConstraints(pattern=rf"^{STEM.pattern}$")]
    job: bool


def read_request(message: object, max_frames: int) -> tuple[GenerationRequest, DecodedImage, str, str, bool]:
    """The request, its upload's timing, its owner, its output's stem and whether it is a job;
    UntrustedMessage for a task this service cannot have sent (more than `max_frames` edge maps, a stem that
    is no file stem, ...)."""
    try:
        task = _Task.model_validate(message)
        fields = dict(task.request)
        images = fields.get("control_images")
        if not isinstance(images, list) or not 1 <= len(images) <= max_frames:
            raise UntrustedMessage(f"a task must carry 1 to {max_frames} edge maps")
        fields["control_images"] = tuple(_image(text) for text in images)
        # JSON has no tuples: the LoRA set comes back as lists, and requests batch by it, so it must hash.
        fields["loras"] = tuple((name, weight) for name, weight in fields.get("loras", ()))
        if len(json.dumps(fields.get("recipe", {}))) > MAX_RECIPE_CHARS:
            raise UntrustedMessage(f"a recipe longer than {MAX_RECIPE_CHARS} characters")
        request = GenerationRequest(**fields)
        if not isinstance(request.request_id, str) or not isinstance(request.recipe, dict):
            raise UntrustedMessage("a request id or recipe of the wrong type")
    except (ValidationError, TypeError, ValueError) as exc:
        raise UntrustedMessage(f"not a task this service sends ({_first_line(exc)})") from None
    upload = DecodedImage(task.upload.format, (), tuple(task.upload.durations_ms), task.upload.loop)
    return request, upload, task.owner, task.stem, task.job


def done(output: RenderedOutput) -> dict:
    return {
        "kind": "done", "data": base64.b64encode(output.data).decode("ascii"), "mimetype": output.mimetype,
        "file_name": output.file_name, "seconds": output.seconds, "worker": output.worker, "images": output.images,
    }


def failed(error: ServiceError) -> dict:
    return {
        "kind": "failed", "error": type(error).__name__, "status": error.status, "message": error.message,
        "retry_after": error.retry_after,
    }


class Done(BaseModel):
    kind: Literal["done"]
    data: Annotated[str, StringConstraints(max_length=MAX_RESULT_BYTES * 4 // 3 + 4)]
    mimetype: Literal["image/png", "image/gif"]
    # Named by the web process's stem: a plain file name of OUTPUT_DIR, never a path.
    file_name: Annotated[str, StringConstraints(pattern=rf"^{STORED_NAME.pattern}$")]
    seconds: float = Field(ge=0, allow_inf_nan=False)
    worker: Annotated[str, StringConstraints(max_length=300)] = "unknown"
    images: int = Field(ge=0, le=100_000)


class Failed(BaseModel):
    kind: Literal["failed"]
    error: Annotated[str, StringConstraints(max_length=100)]
    message: Annotated[str, StringConstraints(max_length=MAX_MESSAGE_CHARS)]
    retry_after: int | None = Field(None, ge=0, le=3600)


Reply = Done | Failed
_REPLY: TypeAdapter[Reply] = TypeAdapter(Annotated[Reply, Field(discriminator="kind")])


def read_reply(reply: object) -> Reply:
    """A GPU worker's answer, checked; UntrustedMessage for one this service cannot have sent."""
    try:
        return _REPLY.validate_python(reply)
    except ValidationError as exc:
        raise UntrustedMessage(f"not a reply this service sends ({_first_line(exc)})") from None


def read_output(reply: Done) -> RenderedOutput:
    try:
        data = base64.b64decode(reply.data, validate=True)
    except binascii.Error:
        raise UntrustedMessage("a result that is not base64") from None
    return RenderedOutput(data, reply.mimetype, reply.file_name, reply.seconds, reply.worker, reply.images)


def _png_text(image: Image.Image) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def _image(text: object) -> Image.Image:
    """A PNG, its size read from its header and bounded before any pixel is decoded."""
    if not isinstance(text, str):
        raise UntrustedMessage("an image that is not text")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=["PNG"])
        if max(image.size) > MAX_EDGE_MAP_SIDE:
            raise UntrustedMessage(
                f"an image of {image.width}x{image.height}, larger than {MAX_EDGE_MAP_SIDE} a side"
            )
        image.load()
    except (binascii.Error, OSError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL: SyntaxError too
        raise UntrustedMessage(f"an image that is no PNG ({_first_line(exc)})") from None
    return image


def _first_line(exc: BaseException) -> str:
    """What was wrong, in one line: for pydantic, where and what."""
    if isinstance(exc, ValidationError) and exc.errors():
        error = exc.errors()[0]
        return f"{'.'.join(map(str, error['loc']))}: {error['msg']}"[:300]
    return first_line(exc)
