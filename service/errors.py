"""The failures the service reports, for the layer above: defined where they are raised (the model and media
modules of stable_diffusion/), each with the HTTP status it maps to; web/ imports them from here."""

from stable_diffusion.errors import (
    Conflict,
    DecodersBusy,
    GenerationCanceled,
    GenerationFailed,
    GenerationOutOfMemory,
    GenerationTimeout,
    Gone,
    InvalidField,
    ModelNotReady,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServiceError,
    StorageFull,
    TooManyRequests,
    Unauthorized,
    UnsupportedImage,
)

__all__ = [
    "Conflict",
    "DecodersBusy",
    "GenerationCanceled",
    "GenerationFailed",
    "GenerationOutOfMemory",
    "GenerationTimeout",
    "Gone",
    "InvalidField",
    "ModelNotReady",
    "NotFound",
    "PayloadTooLarge",
    "QueueFull",
    "ServiceError",
    "StorageFull",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedImage",
]
