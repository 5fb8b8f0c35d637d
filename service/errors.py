"""Every failure the service reports, with the HTTP status it maps to. Those the service and web layers raise
are defined here; those the model layer raises (a field's value, an unsupported image, out of memory, a canceled
run) are defined in stable_diffusion/errors.py and named here too: service/ and web/ import every error from
this module, and nothing else."""

from stable_diffusion.errors import (
    GenerationCanceled,
    GenerationOutOfMemory,
    InvalidField,
    ServiceError,
    UnsupportedImage,
)


class Unauthorized(ServiceError):
    """No API key, or one that is not configured."""

    status = 401


class PayloadTooLarge(ServiceError):
    """A request body or field over its limit."""

    status = 413


class TooManyRequests(ServiceError):
    """Over the key's rate limit or its share of the queue."""

    status = 429


class QueueFull(ServiceError):
    """The generation queue holds QUEUE_SIZE requests already."""

    status = 503


class ModelNotReady(ServiceError):
    """The model is loading, warming up or failed (celery mode: no GPU worker is ready)."""

    status = 503


class DecodersBusy(ServiceError):
    """MAX_CONCURRENT_DECODES uploads are being decoded already."""

    status = 503


class NotFound(ServiceError):
    """No such job for this key."""

    status = 404


class Conflict(ServiceError):
    """A job that has finished cannot be canceled."""

    status = 409


class Gone(ServiceError):
    """A job's result was removed."""

    status = 410


class GenerationFailed(ServiceError):
    """A generation failed for a reason the caller cannot fix."""

    status = 500


class GenerationTimeout(ServiceError):
    """A generation took longer than GENERATION_TIMEOUT_S."""

    status = 504


class StorageFull(ServiceError):
    """The disk is full: nothing was saved."""

    status = 507


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
