"""Model files read while they may change: a file is read whole into memory, never mapped (truncating a mapped
file under its reader kills the process with SIGBUS), and its version is checked before and after, so a reader
gets one version's bytes or an error. Hashes are computed once per file version in this process, on a
background thread, from bytes already read where there are some. No torch here."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# safetensors' own bound on a header (its Rust reader refuses more).
MAX_HEADER_BYTES = 100_000_000
# File versions whose hashes are kept.
VERSIONS_KEPT = 4096

log = logging.getLogger(__name__)


class FileChanged(OSError):
    """The file changed while it was read: what was read belongs to no version of it."""


@dataclass(frozen=True)
class FileVersion:
    """One version of a file: a file rewritten in place (cp) changes its size, times or both; one copied over
    it (mv) has another inode."""

    path: Path
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path, status: os.stat_result) -> FileVersion:
        return cls(path, status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino)


@dataclass(frozen=True)
class FileHashes:
    """`sha256` of the whole file; `tensors_sha256` of what follows a safetensors header (what AUTOMATIC1111
    hashes a LoRA by), None for another kind of file."""

    sha256: str
    tensors_sha256: str | None


def version_of(path: Path, follow_links: bool = True) -> FileVersion:
    """The file's current version; OSError when it is gone, or is not a regular file."""
    status = path.stat() if follow_links else path.lstat()
    if not stat.S_ISREG(status.st_mode):
        raise OSError(f"{path.name} is not a regular file")
    return FileVersion.of(path, status)


def read_whole(path: Path, max_bytes: int, follow_links: bool = True) -> tuple[bytes, FileVersion]:
    """The file's bytes and the version they are; FileChanged when it changed while read, OSError when it is
    not a regular file (or, with `follow_links` off, is a link), or is larger than `max_bytes`."""
    flags = os.O_RDONLY | (0 if follow_links else os.O_NOFOLLOW)
    descriptor = os.open(path, flags)
    with os.fdopen(descriptor, "rb") as file:
        before = os.fstat(descriptor)
        if not stat.S_ISREG(before.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        if before.st_size > max_bytes:
            raise OSError(f"{path.name} is {before.st_size} bytes, more than the {max_bytes} allowed")
        data = file.read(before.st_size + 1)  # a byte more than its size shows a file still growing
        after = os.fstat(descriptor)
    version = FileVersion.of(path, before)
    if FileVersion.of(path, after) != version or len(data) != before.st_size:
        raise FileChanged(f"{path.name} changed while it was read")
    return data, version


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """A safetensors file's header, the tensors' names with their dtype, shape and place, read without mapping
    the file or reading its tensors; ValueError when the file is no whole safetensors file. The format is
    eight bytes of little-endian length, then that many bytes of JSON (safetensors' own reader maps the file)."""
    with path.open("rb") as file:
        head = file.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise ValueError("no safetensors header")
        text = file.read(length)
        size = os.fstat(file.fileno()).st_size
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its safetensors header is not a table of tensors")
    header.pop("__metadata__", None)
    tensors = {name: entry for name, entry in header.items() if isinstance(entry, dict)}
    ends = [entry.get("data_offsets", [0, 0])[-1] for entry in tensors.values()]
    needed = 8 + length + max((end for end in ends if isinstance(end, int)), default=0)
    if needed != size:
        raise ValueError(f"truncated or padded: its header describes {needed} bytes, the file has {size}")
    return tensors


class _Digests:
    """Both hashes of a file fed to it in pieces, in one pass."""

    def __init__(self, safetensors: bool) -> None:
        self._whole, self._tensors = hashlib.sha256(), hashlib.sha256() if safetensors else None
        self._offset, self._skip = 0, 8

    def update(self, piece: bytes | memoryview) -> None:
        """Pieces of at least eight bytes but the last, so the first holds the header's length."""
        self._whole.update(piece)
        if self._tensors is not None:
            if self._offset == 0 and len(piece) >= 8:
                self._skip = 8 + int.from_bytes(piece[:8], "little")
            if self._offset + len(piece) > self._skip:
                self._tensors.update(piece[max(0, self._skip - self._offset):])
        self._offset += len(piece)

    def result(self) -> FileHashes:
        return FileHashes(self._whole.hexdigest(), self._tensors.hexdigest() if self._tensors else None)


def hashes_of(pieces, safetensors: bool) -> FileHashes:
    digests = _Digests(safetensors)
    for piece in pieces:
        digests.update(piece)
    return digests.result()


def _pieces(file, size: int = 1 << 20):
    while piece := file.read(size):
        yield piece


class HashCache:
    """Each file version's hashes, computed once on one background thread: from the file when a listing asks
    (`known` answers None until then), or from bytes a loader has read anyway (`of_bytes`). The thread takes
    one file at a time, so a version asked for twice is found in the cache by its second task."""

    def __init__(self) -> None:
        self._hashes: dict[FileVersion, FileHashes] = {}
        self._asked: set[FileVersion] = set()
        self._lock = threading.Lock()
        self._thread: ThreadPoolExecutor | None = None
        self._thread_pid = 0

    def known(self, version: FileVersion) -> FileHashes | None:
        """The version's hashes if computed; otherwise None, and they are computed in the background."""
        with self._lock:
            hashes = self._hashes.get(version)
            if hashes is None and version not in self._asked:
                self._asked.add(version)
                self._background().submit(self._hash_file, version)
        return hashes

    def of_bytes(self, version: FileVersion, data: bytes) -> Future[FileHashes]:
        """The hashes of `data`, which are the bytes of `version`."""
        with self._lock:
            if version in self._hashes:
                done: Future[FileHashes] = Future()
                done.set_result(self._hashes[version])
                return done
            return self._background().submit(self._hash_bytes, version, data)

    def _background(self) -> ThreadPoolExecutor:
        """This process's hashing thread (a forked child, a gunicorn or Celery worker, has none of its parent's)."""
        if self._thread is None or self._thread_pid != os.getpid():
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="file-hashes")
            self._thread_pid = os.getpid()
        return self._thread

    def _hash_bytes(self, version: FileVersion, data: bytes) -> FileHashes:
        return self._remember(version, lambda: hashes_of([memoryview(data)], _is_safetensors(version)))

    def _hash_file(self, version: FileVersion) -> None:
        try:
            self._remember(version, lambda: _hash_version(version))
        except OSError as exc:  # changed or gone since it was listed: the next listing sees what is there
            log.info("not hashing %s: %s", version.path.name, exc.strerror or exc)
        finally:
            with self._lock:
                self._asked.discard(version)

    def _remember(self, version: FileVersion, compute: Callable[[], FileHashes]) -> FileHashes:
        with self._lock:
            if version in self._hashes:
                return self._hashes[version]
        started = time.perf_counter()
        hashes = compute()
        log.info("hashed %s (%d bytes) in %.2f s", version.path.name, version.size, time.perf_counter() - started)
        with self._lock:
            while len(self._hashes) >= VERSIONS_KEPT:  # the oldest first: files rewritten again and again
                del self._hashes[next(iter(self._hashes))]
            return self._hashes.setdefault(version, hashes)


def _hash_version(version: FileVersion) -> FileHashes:
    """Read in pieces (a listing must not hold a whole large file in memory); FileChanged unless the file was
    that version all along."""
    descriptor = os.open(version.path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(descriptor, "rb") as file:
        if FileVersion.of(version.path, os.fstat(descriptor)) != version:
            raise FileChanged(f"{version.path.name} changed since it was listed")
        hashes = hashes_of(_pieces(file), _is_safetensors(version))
        if FileVersion.of(version.path, os.fstat(descriptor)) != version:
            raise FileChanged(f"{version.path.name} changed while it was read")
    return hashes


def _is_safetensors(version: FileVersion) -> bool:
    return version.path.suffix.lower() == ".safetensors"


# One per process: the web side's listing and the generator's loading share it, so no version is hashed twice.
HASHES = HashCache()
