"""Files the service keeps: uploads and results, named by the server and written atomically."""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
from datetime import datetime
from pathlib import Path

from stable_diffusion.errors import StorageFull


def new_file_stem(now: datetime | None = None) -> str:
    """`YYYYMMDD_HHMMSS_xxxxxx`: sortable by time, and unique across concurrent requests."""
    return f"{(now or datetime.now()):%Y%m%d_%H%M%S}_{secrets.token_hex(3)}"


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
