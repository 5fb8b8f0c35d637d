"""Model files read while they may change: a file is read whole into memory, never mapped (truncating a mapped
file under its reader kills the process with SIGBUS), and its version is checked before and after, so a reader
gets one version's bytes or an error. Hashes are computed once per file version in this process, on a
background thread, from bytes already read where there are some. No torch here."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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


def open_regular(path: Path, follow_links: bool = True) -> BinaryIO:
    """The file open for reading; OSError when it is no regular file (or, with `follow_links` off, a link).
    Opened without blocking, so that a FIFO put in a file's place cannot hold the reader."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    file = os.fdopen(os.open(path, flags), "rb")
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise OSError(f"{path.name} is not a regular file")
    return file


def read_whole(path: Path, max_bytes: int, follow_links: bool = True) -> tuple[bytes, FileVersion]:
    """The file's bytes and the version they are; FileChanged when it changed while read, OSError when it is
    not a regular file (or, with `follow_links` off, is a link), or is larger than `max_bytes`."""
    with open_regular(path, follow_links) as file:
        descriptor = file.fileno()
        before = os.fstat(descriptor)
        if before.st_size > max_bytes:
            raise OSError(f"{path.name} is {before.st_size} bytes, more than the {max_bytes} allowed")
        data = file.read(before.st_size + 1)  # a byte more than its size shows a file still growing
        after = os.fstat(descriptor)
    version = FileVersion.of(path, before)
    if FileVersion.of(path, after) != version or len(data) != before.st_size:
        raise FileChanged(f"{path.name} changed while it was read")
    return data, version


def read_safetensors_header(path: Path, follow_links: bool = False) -> dict[str, dict]:
    """A safetensors file's header, the tensors' names with their dtype, shape and place, read without mapping
    the file or reading its tensors; ValueError when the file is no whole safetensors file. The format is
    eight bytes of little-endian length, then that many bytes of JSON (safetensors' own reader maps the file)."""
    with open_regular(path, follow_links) as file:
        head = file.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise ValueError("no safetensors header")
        text = file.read(length)
        size = os.fstat(file.fileno()).st_size
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its safetensors header is not a table of tensors")
    header.pop("__metadata__", None)
    tensors = {name: entry for name, entry in header.items() if isinstance(entry, dict)}
    ends = [_end(entry.get("data_offsets")) for entry in tensors.values()]
    needed = 8 + length + max(ends, default=0)
    if needed != size:
        raise ValueError(f"truncated or padded: its header describes {needed} bytes, the file has {size}")
    return tensors


def _end(offsets: object) -> int:
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(offset) is int for offset in offsets)):
        raise ValueError("its safetensors header has a tensor without a place in the file")
    return offsets[1]


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


def hashes_of(pieces, tensors: bool) -> FileHashes:
    """`tensors`: also the hash of what follows a safetensors header."""
    digests = _Digests(tensors)
    for piece in pieces:
        digests.update(piece)
    return digests.result()


def _pieces(file, size: int = 1 << 20):
    while piece := file.read(size):
        yield piece


class HashCache:
    """Each file version's hashes, computed once per process: from the file, read in the background when a
    listing asks (`known` answers None until then), or from bytes a loader has read anyway (`of_bytes`, on a
    thread of its own, so a result never waits behind a listing's queue of large files). A version being
    hashed from its file when a loader asks is not hashed again: the loader gets that work's result (or,
    should the file have changed meanwhile, the hashes of its own bytes)."""

    def __init__(self) -> None:
        self._hashes: OrderedDict[FileVersion, FileHashes] = OrderedDict()
        self._hashing: dict[FileVersion, Future[FileHashes]] = {}
        self._asked: set[FileVersion] = set()
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lane] = {}
        self._lanes_lock = threading.Lock()

    def known(self, version: FileVersion, tensors: bool = True) -> FileHashes | None:
        """The version's hashes if computed; otherwise None, and they are computed in the background.
        `tensors`: also the hash of a safetensors file's tensors (AUTOMATIC1111's LoRA hash)."""
        with self._lock:
            hashes = self._hashes.get(version)
            if hashes is None and version not in self._asked and version not in self._hashing:
                self._asked.add(version)
                self._lane("listing").put(lambda: self._hash_file(version, tensors))
        return hashes

    def of_bytes(self, version: FileVersion, data: bytes, tensors: bool = True) -> Future[FileHashes]:
        """The hashes of `data`, which are the bytes of `version`."""
        result: Future[FileHashes] = Future()
        with self._lock:
            hashes, running = self._hashes.get(version), self._hashing.get(version)
        if hashes is not None:
            result.set_result(hashes)
            return result

        def from_bytes() -> None:
            _settle(result, lambda: self._remember(version, hashes_of([memoryview(data)], tensors)))

        def after_file(done: Future[FileHashes]) -> None:
            if done.exception() is None:
                result.set_result(done.result())
            else:
                self._lane("loaded").put(from_bytes)

        if running is not None:
            running.add_done_callback(after_file)
        else:
            self._lane("loaded").put(from_bytes)
        return result

    def _hash_file(self, version: FileVersion, tensors: bool) -> None:
        with self._lock:
            self._asked.discard(version)
            if version in self._hashes or version in self._hashing:
                return
            running = self._hashing[version] = Future()
        try:
            _settle(running, lambda: self._remember(version, _hash_version(version, tensors)))
            if running.exception() is not None:  # changed or gone since it was listed: the next listing sees it
                log.info("not hashing %s: %s", version.path.name, running.exception())
        finally:
            with self._lock:
                self._hashing.pop(version, None)

    def _remember(self, version: FileVersion, hashes: FileHashes) -> FileHashes:
        log.info("hashed %s (%d bytes)", version.path.name, version.size)
        with self._lock:
            self._hashes[version] = hashes
            while len(self._hashes) > VERSIONS_KEPT:  # the oldest first: files rewritten again and again
                self._hashes.popitem(last=False)
        return hashes

    def _lane(self, name: str) -> _Lane:
        """A daemon thread per kind of work: what it has queued never holds up the process's exit."""
        with self._lanes_lock:
            lane = self._lanes.get(name)
            if lane is None or not lane.alive:  # none yet, or a forked child, which has none of its parent's
                lane = self._lanes[name] = _Lane(f"file-hashes-{name}")
            return lane


class _Lane:
    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def put(self, work: Callable[[], None]) -> None:
        self._work.put(work)

    def _run(self) -> None:
        while True:
            self._work.get()()


def _settle(future: Future, compute: Callable[[], object]) -> None:
    try:
        future.set_result(compute())
    except Exception as exc:
        future.set_exception(exc)


def _hash_version(version: FileVersion, tensors: bool) -> FileHashes:
    """Read in pieces (a listing must not hold a whole large file in memory); FileChanged unless the file was
    that version all along."""
    with open_regular(version.path, follow_links=False) as file:
        if FileVersion.of(version.path, os.fstat(file.fileno())) != version:
            raise FileChanged(f"{version.path.name} changed since it was listed")
        hashes = hashes_of(_pieces(file), tensors)
        if FileVersion.of(version.path, os.fstat(file.fileno())) != version:
            raise FileChanged(f"{version.path.name} changed while it was read")
    return hashes


# One per process: the web side's listing and the generator's loading share it, so no version is hashed twice.
HASHES = HashCache()
