"""The failures the model layer raises, each carrying the HTTP status it maps to (the service layer's own are in
service/errors.py), and the error of a model that cannot load."""

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


class UnsupportedImage(ServiceError):
    status = 415


class GenerationOutOfMemory(ServiceError):
    status = 503


class GenerationCanceled(ServiceError):
    """Raised inside a run whose job was canceled; the worker stops it at the next step."""

    status = 409


class ModelLoadError(Exception):
    """The weights could not be found or loaded, or the device cannot run them; the message says what was
    tried and which setting to change. Raised at start-up, never to a caller."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, at most 300 characters, for a message; its type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
