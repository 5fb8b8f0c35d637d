"""Files the service keeps: uploads and results, named by the server and written atomically."""

from __future__ import annotations

import errno
import os
import re
import secrets
import tempfile
from datetime import datetime
from pathlib import Path

from service.errors import StorageFull

# What new_file_stem makes, and the files the service names after it.
STEM = re.compile(r"\d{8}_\d{6}_[0-9a-f]{6}")
STORED_NAME = re.compile(rf"{STEM.pattern}\.(png|jpg|gif)")


class UntrustedName(ValueError):
    """A file name read from outside this process (Redis, which any GPU host can write) that the service
    cannot have made: never used as a path."""


def new_file_stem(now: datetime | None = None) -> str:
    """`YYYYMMDD_HHMMSS_xxxxxx`: sortable by time, and unique across concurrent requests."""
    return f"{(now or datetime.now()):%Y%m%d_%H%M%S}_{secrets.token_hex(3)}"


def stored_file(folder: Path, name: object) -> Path:
    """The path in `folder` of a file the service named (a stem of new_file_stem and an image's extension);
    UntrustedName for any other name, so that a name read from a store never reaches outside the folder."""
    if not isinstance(name, str) or not STORED_NAME.fullmatch(name):
        raise UntrustedName(f"{str(name)[:80]!r} is not a file name this service makes")
    return folder / name


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except OSError as exc:
        Path(handle.name).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(
                f"The server's disk is full, so {path.parent.name}/ could not be written; "
                "the result was not saved. Retry later."
            ) from None
        raise
