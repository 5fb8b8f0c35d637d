"""Drops the libraries' log messages that report nothing wrong here, so a start-up prints only what matters."""

from __future__ import annotations

import logging
import warnings

# (logger, a phrase of the message): each is said on every start and needs no action.
NOISE = (
    # transformers offers torchvision-backed image processors; the pipelines here use none (no safety checker).
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    # diffusers warns on every move of a model between devices, even when no module needs float32 (`[]`).
    ("diffusers.models.modeling_utils", "should be kept in float32: []."),
)


class _DropPhrase(logging.Filter):
    def __init__(self, phrase: str) -> None:
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


def quiet_library_noise() -> None:
    for logger_name, phrase in NOISE:
        logging.getLogger(logger_name).addFilter(_DropPhrase(phrase))
    # Newer diffusers name it `dtype`; `torch_dtype` is the name every version this service supports takes.
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
