"""The text fields of a generation request, declared once with their limits and defaults."""

# No `from __future__ import annotations`: the field types below close over the settings' limits.

import secrets
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from service.errors import InvalidField
from service.settings import Settings
from stable_diffusion.lora_library import (
    MAX_LORAS_PER_REQUEST,
    MAX_WEIGHT,
    MIN_WEIGHT,
    LoraLibrary,
    LoraSet,
    merge,
    parse_loras,
    take_prompt_loras,
)
from stable_diffusion.recipe import SAMPLERS

MAX_SEED = 2**32 - 1
MIN_RESOLUTION = 256


def with_seed(fields: BaseModel) -> BaseModel:
    """The fields, with a seed drawn when the caller gave none (the one place a seed is drawn)."""
    if fields.seed is not None:
        return fields
    return fields.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})


def edge_fields_model(settings: Settings) -> type[BaseModel]:
    """The fields that shape the edge map: what /preprocess takes, and what /generate builds on."""
    min_resolution = min(MIN_RESOLUTION, settings.default_resolution)

    class EdgeFields(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        resolution: int = Field(
            settings.default_resolution, ge=min_resolution, le=settings.max_resolution, multiple_of=8,
            description=(
                f"the output's longer side in pixels, a multiple of 8 from {min_resolution} "
                f"to {settings.max_resolution}; the aspect ratio is kept"
            ),
        )
        low_threshold: int = Field(100, ge=0, le=255, description="Canny's lower threshold, 0 to 255")
        high_threshold: int = Field(200, ge=0, le=255, description="Canny's upper threshold, 0 to 255")

        @model_validator(mode="before")
        @classmethod
        def _plain_numbers(cls, values: object) -> object:
            return _refuse_underscore_digits(cls, values)

        @model_validator(mode="after")
        def _thresholds_ordered(self):
            return _require_below(self, "low_threshold", "high_threshold")

    return EdgeFields


def generate_fields_model(settings: Settings, library: LoraLibrary | None = None) -> type[BaseModel]:
    """The pydantic model of /generate's text fields, with the limits `settings` sets; LoRA names are checked
    against `library` (default: LORA_DIR's)."""
    prompt_text = StringConstraints(strip_whitespace=True, max_length=settings.max_prompt_chars)
    library = library or LoraLibrary(settings.lora_dir)

    class GenerateFields(edge_fields_model(settings)):
        prompt: Annotated[str, prompt_text, StringConstraints(min_length=1)] = Field(
            description=f"what to paint, 1 to {settings.max_prompt_chars} characters"
        )
        negative_prompt: Annotated[str, prompt_text] = Field(
            "", description=f"what to avoid, up to {settings.max_prompt_chars} characters"
        )
        sensitivity: float = Field(
            1.0, ge=0.0, le=2.0, allow_inf_nan=False,
            description="how strictly the edges are followed (ControlNet conditioning scale), 0 to 2",
        )
        seed: int | None = Field(
            None, ge=0, le=MAX_SEED, description=f"an integer from 0 to {MAX_SEED}; random when absent"
        )
        steps: int = Field(
            settings.default_steps, ge=1, le=settings.max_steps,
            description=f"denoising steps, 1 to {settings.max_steps}",
        )
        guidance_scale: float = Field(
            7.5, ge=0.0, le=30.0, allow_inf_nan=False, description="how closely the prompt is followed, 0 to 30"
        )
        control_start: float = Field(
            0.0, ge=0.0, le=1.0, allow_inf_nan=False,
            description="fraction of the steps at which ControlNet starts guiding, 0 to 1",
        )
        control_end: float = Field(
            1.0, ge=0.0, le=1.0, allow_inf_nan=False,
            description="fraction of the steps at which ControlNet stops guiding, 0 to 1",
        )
        refine_strength: float = Field(
            settings.refine_strength, ge=0.0, le=1.0, allow_inf_nan=False,
            description="strength of the img2img refinement pass, 0 to 1; 0 turns it off",
        )
        scheduler: Literal[tuple(SAMPLERS)] = Field(
            "unipc", description=f"the sampler, one of {', '.join(SAMPLERS)}"
        )
        progress_gif: Annotated[bool, BeforeValidator(_true_or_false)] = Field(
            False, description="true or false: return an animated GIF of the denoising instead of the PNG"
        )
        loras: Annotated[LoraSet, BeforeValidator(_lora_text), WithJsonSchema({"type": "string"})] = Field(
            (), json_schema_extra={"default": ""}, description=(
                f"LoRAs to apply, as name:weight pairs separated by commas (name: a file of LORA_DIR without "
                f".safetensors, GET /models lists them; weight {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, 1 when left out; "
                f"at most {MAX_LORAS_PER_REQUEST}); <lora:name:weight> in the prompt works too"
            ),
        )

        @model_validator(mode="before")
        @classmethod
        def _loras_of_the_prompt(cls, values: object) -> object:
            """AUTOMATIC1111's <lora:name:weight> tags leave the prompt and join the `loras` field."""
            if isinstance(values, dict) and isinstance(values.get("prompt"), str) and "<" in values["prompt"]:
                prompt, tagged = take_prompt_loras(values["prompt"])
                if tagged:
                    values = {**values, "prompt": prompt, "loras": merge(_lora_text(values.get("loras", "")), tagged)}
            return values

        @model_validator(mode="after")
        def _control_window_ordered(self):
            return _require_below(self, "control_start", "control_end")

        @model_validator(mode="after")
        def _loras_exist(self):
            if self.loras:
                library.check(self.loras)
            return self

    return GenerateFields


def _lora_text(value: object) -> object:
    return parse_loras(value) if isinstance(value, str) else value


def _true_or_false(value: object) -> object:
    """Only the words the documentation promises; pydantic alone would also take 0, 1, yes, off..."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false"):
            raise ValueError("must be true or false")
        return value.strip().lower() == "true"
    return value


def _refuse_underscore_digits(model: type[BaseModel], values: object) -> object:
    """Python (and so pydantic) reads `1_0` as 10; no client means that, so numbers are plain digits."""
    if isinstance(values, dict):
        for name, value in values.items():
            field = model.model_fields.get(name)
            if field is not None and field.annotation in _NUMBERS and isinstance(value, str) and "_" in value:
                raise ValueError(f"{name}: {value!r} is not a number (no underscores between digits); send "
                                 f"{field.description}")
    return values


_NUMBERS = (int, float, int | None)


def _require_below(fields: BaseModel, lower: str, upper: str) -> BaseModel:
    low, high = getattr(fields, lower), getattr(fields, upper)
    if low >= high:
        raise ValueError(f"{lower} ({low}) must be below {upper} ({high})")
    return fields


def parse_fields(model: type[BaseModel], values: dict[str, str]) -> BaseModel:
    """Validate text fields, turning pydantic's errors into one message that names each field and its fix."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise InvalidField(_describe(model, exc)) from None


def _describe(model: type[BaseModel], exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        if not error["loc"]:
            problems.append(error["msg"].removeprefix("Value error, "))
            continue
        name = str(error["loc"][0])
        field = model.model_fields.get(name)
        if error["type"] == "extra_forbidden":
            problems.append(f"{name} is not a field of this endpoint; the fields are {', '.join(model.model_fields)}")
        elif error["type"] == "missing":
            problems.append(f"{name} is required: {field.description}")
        else:
            shown = repr(error["input"])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            problems.append(f"{name}: {error['msg']} (got {shown}); send {field.description}")
    return "; ".join(problems)
