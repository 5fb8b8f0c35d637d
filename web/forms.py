"""Reading a multipart request: one `image` file and text fields, checked before anything else happens."""

from __future__ import annotations

from flask import request
from pydantic import BaseModel

from service.errors import InvalidField, PayloadTooLarge
from service.fields import parse_fields
from service.settings import Settings


def read_image_form(fields_model: type[BaseModel], settings: Settings) -> tuple[BaseModel, bytes]:
    """The validated text fields and the raw bytes of the one `image` file of a multipart request."""
    for name in request.files:
        if name != "image":
            raise InvalidField(
                f"{name} was sent as a file; send it as a plain text field (curl -F '{name}=...')."
                if name in fields_model.model_fields
                else f"{name} is not a field of this endpoint; the only file field is image."
            )
    images = request.files.getlist("image")
    if not images:
        if "image" in request.form:
            raise InvalidField("image must be a file upload, e.g. curl -F image=@photo.png.")
        raise InvalidField(
            "image is required: send a multipart/form-data request with the picture in the field "
            "image, e.g. curl -F image=@photo.png."
        )
    values = {}
    for name in request.form:
        sent = request.form.getlist(name)
        if len(sent) > 1:
            raise InvalidField(f"{name} was sent {len(sent)} times; send it once.")
        if "\ufffd" in sent[0]:
            # Werkzeug decodes text fields as UTF-8 and puts U+FFFD where the bytes were not: refused rather
            # than generating from a prompt the client never wrote.
            raise InvalidField(
                f"{name} is not valid UTF-8 text (bytes that are not UTF-8 arrive as U+FFFD); send the form "
                "fields encoded as UTF-8."
            )
        values[name] = sent[0]
    if len(images) > 1:
        raise InvalidField(f"image was sent {len(images)} times; send one picture per request.")
    fields = parse_fields(fields_model, values)
    data = images[0].read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"image is larger than the {settings.max_upload_mb:g} MB limit (MAX_UPLOAD_MB); send a smaller file."
        )
    return fields, data
