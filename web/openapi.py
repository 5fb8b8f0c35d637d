"""The OpenAPI 3.0 document of the API: its paths and answers are listed here, and every schema is generated
from the pydantic models the endpoints validate with (the forms) and answer with (the JSON bodies)."""

from __future__ import annotations

from pydantic import BaseModel

from service.settings import Settings
from web.errors import Error
from web.jobs import ShownJob
from web.operations import Health, Info, Models, NotReady, Ready

SCHEMAS = "#/components/schemas/"
# The JSON bodies the API answers, by their name in the document.
BODIES: dict[str, type[BaseModel]] = {
    "Error": Error, "Health": Health, "Ready": Ready, "NotReady": NotReady, "Info": Info, "Models": Models,
    "Job": ShownJob,
}

ERROR_STATUSES = {
    "400": "A field is missing or invalid; the message names it and the fix",
    "401": "The x-api-key header is missing or wrong",
    "404": "No such job for this API key",
    "409": "The job is not in a state that allows this",
    "410": "The job's result file is gone (removed by the retention period or by an operator)",
    "413": "The upload or the request is over its size limit",
    "415": "The image is not a PNG, JPEG or GIF, or cannot be decoded",
    "429": "This key is over its rate limit or its share of the queue; see Retry-After",
    "500": "Generation failed; the message carries a request id to look up in the server log",
    "503": (
        "The queue is full, the model is not ready, the GPU ran out of memory, or the server is decoding as "
        "many uploads as it may (MAX_CONCURRENT_DECODES); see Retry-After"
    ),
    "504": "The result did not come within GENERATION_TIMEOUT_S",
    "507": "The server's disk is full",
}
IMAGE_ERRORS = ("400", "401", "413", "415", "429")
GENERATION_ERRORS = (*IMAGE_ERRORS, "500", "503", "507")


def build_document(settings: Settings, generate_fields: type[BaseModel], edge_fields: type[BaseModel]) -> dict:
    """The document of an app with these settings and field models (its extensions of the same names)."""
    generate_form = _form_schema(generate_fields)
    preprocess_form = _form_schema(edge_fields)
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    picture = _text(
        "The picture: a PNG, or an animated GIF for an animated upload or progress_gif=true",
        "image/png",
        "image/gif",
        binary=True,
    ) | {
        "headers": {
            "X-Seed": {"schema": {"type": "integer"}, "description": "The seed used"},
            "X-Worker": {"schema": {"type": "string"}, "description": "The process that ran the model (host:pid)"},
            "X-Request-ID": {"schema": {"type": "string"}},
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Canny ControlNet image generation API",
            "version": "1.0.0",
            "description": (
                "Upload a picture and a prompt; its Canny edge map guides Stable Diffusion + ControlNet, "
                f"then a refinement pass. Uploads up to {settings.max_upload_mb:g} MB, "
                f"{settings.max_image_pixels} pixels and {settings.max_gif_frames} GIF frames. "
                "Every endpoint but /health and this document needs the API key in the x-api-key header: "
                "here, enter it with Authorize."
            ),
        },
        "security": [{"ApiKey": []}],
        "paths": {
            "/health": {"get": _operation("Alive", {"200": _json("Alive", "Health")}, public=True)},
            "/ready": {
                "get": _operation(
                    "Ready once the model is loaded and the worker runs",
                    {"200": _json("Ready", "Ready"), "503": _json("Not ready", "NotReady"), "401": _error("401")},
                )
            },
            "/info": {
                "get": _operation("The model, the fields and the limits", {"200": _json("About", "Info")}, "401")
            },
            "/models": {
                "get": _operation(
                    "The base model, the ControlNet (single files with size and hash) and the LoRAs of LORA_DIR",
                    {"200": _json("The models", "Models")},
                    "401",
                )
            },
            "/metrics": {
                "get": _operation(
                    "Prometheus metrics",
                    {"200": _text("Text exposition format", "text/plain")},
                    "401",
                )
            },
            "/openapi.json": {
                "get": _operation("This document", {"200": _json("OpenAPI document", "Object")}, public=True)
            },
            "/preprocess": {
                "post": _operation(
                    "The Canny edge map /generate would use",
                    {"200": _text("The edge map", "image/png", binary=True)},
                    *IMAGE_ERRORS,
                    "503",
                    form="PreprocessForm",
                )
            },
            "/generate": {
                "post": _operation(
                    "Generate and wait for the picture",
                    {"200": picture},
                    *GENERATION_ERRORS,
                    "504",
                    form="GenerateForm",
                )
            },
            "/jobs": {
                "post": _operation(
                    "Queue a generation; answers at once",
                    {"202": _json("Queued", "Job") | {"headers": {"Location": {"schema": {"type": "string"}}}}},
                    *GENERATION_ERRORS,
                    form="GenerateForm",
                )
            },
            "/jobs/{job_id}": {
                "parameters": [job_id],
                "get": _operation("A job's status and progress", {"200": _json("The job", "Job")}, "401", "404"),
                "delete": _operation(
                    "Cancel: a queued job never runs, a running one stops at its next step",
                    {"200": _json("Canceled", "Job"), "202": _json("Stopping at the next step", "Job")},
                    "401", "404", "409",
                ),
            },
            "/jobs/{job_id}/result": {
                "parameters": [job_id],
                "get": _operation("The picture of a succeeded job", {"200": picture}, "401", "404", "409", "410"),
            },
            "/jobs/{job_id}/events": {
                "parameters": [job_id],
                "get": _operation(
                    "Server-Sent Events: status, progress and preview (a PNG data URL, at most once a second); "
                    "the stream ends after the job's last status",
                    {"200": _events()},
                    "401", "404",
                ),
            },
        },
        "components": {
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": {
                "GenerateForm": generate_form,
                "PreprocessForm": preprocess_form,
                "Object": {"type": "object"},
                **_model_schemas(BODIES),
            },
        },
    }


def _form_schema(model: type[BaseModel]) -> dict:
    """A field model as a multipart/form-data body."""
    schema = _openapi_30(model.model_json_schema())
    properties = {"image": {"type": "string", "format": "binary", "description": "PNG, JPEG or GIF, by content"}}
    for name, field in schema["properties"].items():
        # An optional field is simply left out of the form; there is no null to send.
        if field.pop("nullable", False):
            field.pop("default", None)
        properties[name] = field
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["image", *schema.get("required", [])],
        "properties": properties,
    }


def _model_schemas(models: dict[str, type[BaseModel]]) -> dict[str, dict]:
    """Each model's schema under its name, with the schemas it refers to (an enum, a nested model) under theirs."""
    schemas: dict[str, dict] = {}
    for name, model in models.items():
        schema = model.model_json_schema(mode="serialization", ref_template=SCHEMAS + "{model}")
        for used, definition in schema.pop("$defs", {}).items():
            converted = _openapi_30(definition)
            assert schemas.setdefault(used, converted) == converted, f"two different schemas are named {used}"
        schemas[name] = _openapi_30(schema)
    return schemas


def _openapi_30(schema: dict) -> dict:
    """A schema as pydantic writes it (JSON Schema 2020-12) in OpenAPI 3.0's dialect: `nullable` rather than
    a null option, a one-value enum rather than `const`, a `$ref` alone (with anything beside it, in an
    allOf), no titles; its subschemas likewise."""
    schema = dict(schema)
    if {"type": "null"} in schema.get("anyOf", []):
        options = [option for option in schema.pop("anyOf") if option != {"type": "null"}]
        schema = (options[0] if len(options) == 1 else {"anyOf": options}) | schema | {"nullable": True}
    schema.pop("title", None)
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
    if "default" in schema and schema["default"] is None and not schema.get("nullable"):
        del schema["default"]  # a field left out when None: its schema shows no null (SkipJsonSchema)
    if "$ref" in schema and len(schema) > 1:
        schema = {"allOf": [{"$ref": schema.pop("$ref")}]} | schema
    if "properties" in schema:
        schema["properties"] = {name: _openapi_30(field) for name, field in schema["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _openapi_30(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [_openapi_30(option) for option in schema[key]]
    return schema


def _events() -> dict:
    """Each event: its kind, and one JSON object as data (the job for status; id and step otherwise)."""
    event = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": ["status", "progress", "preview"]},
            "data": {"type": "string", "description": "a JSON object"},
        },
    }
    return {"description": "An event stream", "content": {"text/event-stream": {"schema": event}}}


def _json(description: str, schema: str) -> dict:
    reference = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": description, "content": {"application/json": {"schema": reference}}}


def _text(description: str, *media_types: str, binary: bool = False) -> dict:
    schema = {"type": "string", "format": "binary"} if binary else {"type": "string"}
    return {"description": description, "content": {media: {"schema": schema} for media in media_types}}


def _error(status: str) -> dict:
    return _json(ERROR_STATUSES[status], "Error")


def _operation(summary: str, responses: dict, *errors: str, form: str | None = None, public: bool = False) -> dict:
    operation = {"summary": summary, "responses": responses | {status: _error(status) for status in errors}}
    if form is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{form}"}}},
        }
    if public:
        operation["security"] = []
    return operation
