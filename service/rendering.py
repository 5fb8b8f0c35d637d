"""From validated fields and a decoded upload to the model runner's request, and from its result to the file
returned: a PNG carrying its recipe (also in AUTOMATIC1111's text form) or a GIF."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel

from service.errors import InvalidField
from service.fields import with_seed
from service.interface import RenderedOutput
from stable_diffusion.gif_creator import encode_gif, make_progress_gif
from stable_diffusion.image_processing import DecodedImage, encode_png, make_control_images
from stable_diffusion.recipe import SAMPLERS, AppliedLora, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from service.worker import ModelRunner


@dataclass(frozen=True)
class RenderedFile:
    data: bytes
    mimetype: str
    extension: str


def build_request(request_id: str, fields: BaseModel, upload: DecodedImage) -> GenerationRequest:
    """Edge maps for every frame, the seed drawn when none was given."""
    if fields.progress_gif and upload.is_animated:
        raise InvalidField("progress_gif works on still images only; send a PNG or JPEG, or set progress_gif=false.")
    control_images = make_control_images(
        upload, fields.resolution, fields.low_threshold, fields.high_threshold
    )
    seed = with_seed(fields).seed
    return GenerationRequest(
        request_id=request_id,
        control_images=tuple(control_images),
        prompt=fields.prompt,
        negative_prompt=fields.negative_prompt,
        sensitivity=fields.sensitivity,
        seed=seed,
        steps=fields.steps,
        guidance_scale=fields.guidance_scale,
        control_start=fields.control_start,
        control_end=fields.control_end,
        refine_strength=fields.refine_strength,
        scheduler=fields.scheduler,
        progress_gif=fields.progress_gif,
        loras=fields.loras,
        recipe=fields.model_dump() | {"seed": seed, "loras": format_loras(fields.loras)},
    )


def format_loras(loras: tuple[tuple[str, float], ...]) -> str:
    """As the `loras` field takes them, so that a recipe can be sent again."""
    return ",".join(f"{name}:{weight:g}" for name, weight in loras)


def render_output(
    request: GenerationRequest, result: GenerationResult, upload: DecodedImage, runner: ModelRunner, stem: str,
    worker: str,
) -> RenderedOutput:
    """The file a generation gives its caller, named `stem` and the file type (wherever it ran: `worker`)."""
    rendered = _render(request, result, upload, runner.model_name, runner.model_hash)
    return RenderedOutput(
        rendered.data, rendered.mimetype, f"{stem}.{rendered.extension}", result.seconds, worker, len(result.images)
    )


def _render(
    request: GenerationRequest,
    result: GenerationResult,
    upload: DecodedImage,
    model_name: str,
    model_hash: str | None = None,
) -> RenderedFile:
    """A PNG carrying its recipe; a GIF for an animated upload (with its timing) or a progress GIF.
    `model_hash`: AUTOMATIC1111's short hash of a single-file model."""
    if request.progress_gif:
        return RenderedFile(make_progress_gif(result.step_previews, result.images[0]), "image/gif", "gif")
    if upload.is_animated:
        return RenderedFile(encode_gif(result.images, upload.durations_ms, upload.loop), "image/gif", "gif")
    width, height = request.size
    recipe = request.recipe | {"width": width, "height": height, "model": model_name}
    if model_hash:
        recipe["model_hash"] = model_hash
    if result.loras:
        recipe["lora_hashes"] = {lora.name: lora.short_hash for lora in result.loras}
    png = encode_png(result.images[0], a1111_parameters(request, model_name, model_hash, result.loras), recipe)
    return RenderedFile(png, "image/png", "png")


def a1111_parameters(
    request: GenerationRequest,
    model_name: str,
    model_hash: str | None = None,
    loras: tuple[AppliedLora, ...] = (),
) -> str:
    """The recipe in the `parameters` text format AUTOMATIC1111 writes, so its tools can read it: the LoRAs as
    <lora:name:weight> tags in the prompt, their hashes in `Lora hashes`, a single file's in `Model hash`."""
    width, height = request.size
    settings = {
        "Steps": request.steps,
        "Sampler": SAMPLERS[request.scheduler],
        "CFG scale": request.guidance_scale,
        "Seed": request.seed,
        "Size": f"{width}x{height}",
        **({"Model hash": model_hash} if model_hash else {}),
        "Model": model_name,
        "Denoising strength": request.refine_strength,
        "ControlNet": "canny",
        "Control weight": request.sensitivity,
        "Guidance start": request.control_start,
        "Guidance end": request.control_end,
    }
    if loras:
        # Quoted as AUTOMATIC1111 quotes a value holding commas: as a JSON string.
        settings["Lora hashes"] = json.dumps(
            ", ".join(f"{lora.name}: {lora.short_hash}" for lora in loras), ensure_ascii=False
        )
    tags = "".join(f" <lora:{lora.name}:{lora.weight:g}>" for lora in loras)
    return "\n".join(
        [
            request.prompt + tags,
            f"Negative prompt: {request.negative_prompt}",
            ", ".join(f"{key}: {value}" for key, value in settings.items()),
        ]
    )
