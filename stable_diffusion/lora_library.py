"""LoRA files as requests name them: the folder of `.safetensors` files (LORA_DIR), a name being a file stem and
never a path, the `loras` field (`name:weight,name:weight`) and AUTOMATIC1111's `<lora:name:weight>` in a
prompt, and the hashes AUTOMATIC1111 and Civitai identify files by. No torch here: the HTTP side checks names
with it, and the model side (loras.py) finds the files through it."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from stable_diffusion.errors import InvalidField

LORA_SUFFIX = ".safetensors"
MAX_LORAS_PER_REQUEST = 8
MIN_WEIGHT, MAX_WEIGHT = -2.0, 2.0
# What a name may hold: no path separators, and none of the characters the two syntaxes use.
NAME = re.compile(r"[^/\\:,<>\x00-\x1f]+")
PROMPT_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
HASH_CHUNK = 1 << 20

log = logging.getLogger(__name__)

# A request's LoRAs: (name, weight) pairs, sorted by name, so that equal sets compare equal.
LoraSet = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LoraFile:
    """One file of LORA_DIR: `sha256` of the whole file (what Civitai shows), `short_hash` the first twelve
    hex digits of the SHA-256 of its tensors without the header, which AUTOMATIC1111 writes in `Lora hashes`."""

    name: str
    path: Path
    size: int
    sha256: str
    short_hash: str


def file_hashes(path: Path) -> tuple[str, str]:
    """The SHA-256 of the whole file and of what follows a safetensors header, in one read."""
    whole, tensors = hashlib.sha256(), hashlib.sha256()
    with path.open("rb") as file:
        head = file.read(8)
        whole.update(head)
        skip = 8 + int.from_bytes(head, "little") if len(head) == 8 else 0
        offset = len(head)
        while chunk := file.read(HASH_CHUNK):
            whole.update(chunk)
            if offset + len(chunk) > skip:
                tensors.update(chunk[max(0, skip - offset):])
            offset += len(chunk)
    return whole.hexdigest(), tensors.hexdigest()


class LoraLibrary:
    """The LoRA files of one folder, listed afresh on each look (files may be added while the server runs);
    hashes are computed once per file version (size and modification time)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._hashes: dict[tuple, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def names(self) -> dict[str, Path]:
        """Every name a request may use, with its file: not hidden, no spaces around it, nothing a request
        could not write. A folder that is missing or unreadable has none (logged)."""
        if self.folder is None:
            return {}
        try:
            paths = list(self.folder.iterdir())
        except OSError as exc:
            log.warning("LORA_DIR %s cannot be listed (%s): no LoRAs", self.folder, exc.strerror or exc)
            return {}
        named = {path.stem: path for path in paths if path.suffix == LORA_SUFFIX and _nameable(path.stem)}
        return {name: path for name, path in sorted(named.items()) if path.is_file()}

    def check(self, loras: LoraSet) -> None:
        """InvalidField naming the unknown ones and listing what there is."""
        available = self.names()
        unknown = [name for name, _ in loras if name not in available]
        if unknown and self.folder is not None and not self.folder.is_dir():
            raise InvalidField("loras: this server has no LoRAs (its LORA_DIR is not a folder).")
        if unknown:
            listed = ", ".join(available) if available else f"none: the server's LORA_DIR has no {LORA_SUFFIX} files"
            raise InvalidField(f"loras: no LoRA named {', '.join(map(repr, unknown))}; available: {listed}.")

    def file(self, name: str) -> LoraFile:
        """The file and its hashes; InvalidField when it is gone or cannot be read."""
        path = self.names().get(name)
        if path is None:
            self.check(((name, 1.0),))
        try:
            stat = path.stat()
            # A file copied over another keeps no ctime or inode: its hashes are computed anew.
            key = (path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
            # One hashing at a time: callers asking for the same file wait for its hashes instead of reading it too.
            with self._lock:
                if key not in self._hashes:
                    self._hashes[key] = file_hashes(path)
                hashes = self._hashes[key]
        except OSError as exc:
            raise InvalidField(
                f"loras: the file of LoRA {name!r} cannot be read ({exc.strerror or exc}); ask the operator."
            ) from None
        return LoraFile(name, path, stat.st_size, hashes[0], hashes[1][:12])

    def describe(self) -> list[LoraFile]:
        """Every LoRA that can be read (one that cannot is logged and left out)."""
        files = []
        for name in self.names():
            try:
                files.append(self.file(name))
            except InvalidField as exc:
                log.warning("%s", exc.message)
        return files


def parse_loras(text: str) -> LoraSet:
    """`name:weight,name:weight` (a name alone weighs 1) as (name, weight) pairs, sorted by name."""
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    _check_count(len(entries), "loras")
    return _as_set([_pair(entry, "loras") for entry in entries], "loras")


def take_prompt_loras(prompt: str) -> tuple[str, LoraSet]:
    """The prompt without its `<lora:name:weight>` tags, and the LoRAs they name."""
    tags = list(PROMPT_TAG.finditer(prompt))
    _check_count(len(tags), "prompt")
    pairs = [_pair(match.group(1).strip(), "prompt", match.group(0)) for match in tags]
    cleaned = re.sub(r"\s+(?=[,.;]|$)", "", re.sub(r"\s{2,}", " ", PROMPT_TAG.sub(" ", prompt))).strip(" ,")
    return cleaned, _as_set(pairs, "prompt")


def merge(first: LoraSet, second: LoraSet) -> LoraSet:
    return _as_set([*first, *second], "loras")


def _nameable(name: str) -> bool:
    return bool(NAME.fullmatch(name)) and name == name.strip() and not name.startswith(".") and len(name) <= 255


def _pair(entry: str, field: str, shown: str | None = None) -> tuple[str, float]:
    shown = shown or entry
    name, _, weight_text = entry.partition(":")
    name = name.strip()
    if not _nameable(name):
        raise InvalidField(
            f"{field}: {shown[:80]!r} does not name a LoRA; write name:weight (the file's name without "
            f"{LORA_SUFFIX}, no path), weight from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}."
        )
    if not weight_text.strip():
        return name, 1.0
    try:
        weight = float(weight_text)
    except ValueError:
        weight = math.nan
    if not (MIN_WEIGHT <= weight <= MAX_WEIGHT) or "_" in weight_text:
        raise InvalidField(
            f"{field}: the weight of LoRA {name!r} is {weight_text.strip()[:20]!r}; send a number from "
            f"{MIN_WEIGHT:g} to {MAX_WEIGHT:g}."
        )
    return name, weight


def _check_count(count: int, field: str) -> None:
    """Before anything is parsed, so that a field of thousands of entries costs no more than a glance."""
    if count > MAX_LORAS_PER_REQUEST:
        raise InvalidField(f"{field}: {count} LoRAs; a request may use at most {MAX_LORAS_PER_REQUEST}.")


def _as_set(pairs: list[tuple[str, float]], field: str) -> LoraSet:
    _check_count(len(pairs), field)
    twice = sorted(name for name, count in Counter(name for name, _ in pairs).items() if count > 1)
    if twice:
        raise InvalidField(f"{field}: LoRA {', '.join(map(repr, twice))} is named twice; name each LoRA once.")
    return tuple(sorted(pairs))
