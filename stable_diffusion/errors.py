"""Failures the service reports to its callers, each carrying the HTTP status it maps to."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `message` is safe to show a caller and says what to do about it."""

    status = 500

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidField(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class PayloadTooLarge(ServiceError):
    status = 413


class UnsupportedImage(ServiceError):
    status = 415


class TooManyRequests(ServiceError):
    status = 429


class QueueFull(ServiceError):
    status = 503


class ModelNotReady(ServiceError):
    status = 503


class DecodersBusy(ServiceError):
    status = 503


class GenerationOutOfMemory(ServiceError):
    status = 503


class GenerationCanceled(ServiceError):
    """Raised inside a run whose job was canceled; the worker stops it at the next step."""

    status = 409


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Gone(ServiceError):
    status = 410


class GenerationFailed(ServiceError):
    status = 500


class GenerationTimeout(ServiceError):
    status = 504


class StorageFull(ServiceError):
    status = 507


class ModelLoadError(Exception):
    """The weights could not be found or loaded, or the device cannot run them; the message says what was
    tried and which setting to change. Raised at start-up, never to a caller."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, at most 300 characters, for a message; its type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
