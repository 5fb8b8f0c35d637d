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


class QueueUnreachable(ServiceError):
    """QUEUE_BACKEND=celery: the Redis server between web processes and GPU workers does not answer."""

    status = 503


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
    "QueueUnreachable",
    "ServiceError",
    "StorageFull",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedImage",
]
