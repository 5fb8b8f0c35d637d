"""LoRA files as requests name them: the folder of `.safetensors` files (LORA_DIR), a name being a file stem and
never a path, the `loras` field (`name:weight,name:weight`) and AUTOMATIC1111's `<lora:name:weight>` in a
prompt, and the hashes AUTOMATIC1111 and Civitai identify files by. No torch here: the HTTP side checks names
with it, and the model side (loras.py) reads the files through it."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from stable_diffusion.errors import InvalidField
from stable_diffusion.file_reading import (
    HASHES,
    FileChanged,
    FileVersion,
    read_safetensors_header,
    read_whole,
    version_of,
)

LORA_SUFFIX = ".safetensors"
MAX_LORAS_PER_REQUEST = 8
MIN_WEIGHT, MAX_WEIGHT = -2.0, 2.0
# The largest LoRA file read (SDXL LoRAs of rank 256 are under 2 GB); a LoRA is read whole into memory.
MAX_LORA_BYTES = 4 << 30
# A file being copied in is read again a few times before the request is refused.
READ_ATTEMPTS = 4
# File versions whose headers are kept.
HEADERS_KEPT = 1024
# What a name may hold: no path separators, and none of the characters the two syntaxes use.
NAME = re.compile(r"[^/\\:,<>\x00-\x1f]+")
PROMPT_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
# Model families by the width of the text their UNet attends to.
FAMILIES = {32: "the tiny model", 768: "SD 1.5", 1024: "SD 2.x", 2048: "SDXL"}

_WEIGHT = TypeAdapter(float)

log = logging.getLogger(__name__)

# A request's LoRAs: (name, weight) pairs, sorted by name, so that equal sets compare equal.
LoraSet = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LoraFile:
    """One LoRA of LORA_DIR as /models lists it: `sha256` of the whole file (what Civitai shows), `short_hash`
    the first twelve hex digits of the SHA-256 of its tensors without the header, which AUTOMATIC1111 writes
    in `Lora hashes`; both None until the background hashing has read the file."""

    name: str
    size: int
    sha256: str | None
    short_hash: str | None


@dataclass(frozen=True)
class LoraHeader:
    """What a file's safetensors header says it is: `problem` says why it is no LoRA (None for a LoRA), and
    `text_width` is the width of the text its layers take, where the header shows it."""

    problem: str | None
    text_width: int | None = None


class LoraLibrary:
    """The LoRA files of one folder, listed afresh on each look (files may be added while the server runs).
    A LoRA is a regular file in the folder, or a link to one; a file is read whole (never mapped) and checked
    to be one version throughout (file_reading.py)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._headers: dict[FileVersion, LoraHeader] = {}
        self._skipped: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def names(self) -> dict[str, Path]:
        """Every name a request may use, with its file (links resolved): not hidden, no spaces around it,
        nothing a request could not write. A folder that is missing or unreadable has none (logged)."""
        if self.folder is None:
            return {}
        try:
            folder = self.folder.resolve(strict=True)
            paths = list(folder.iterdir())
        except OSError as exc:
            log.warning("LORA_DIR %s cannot be listed (%s): no LoRAs", self.folder, exc.strerror or exc)
            return {}
        named = {path.stem: path for path in paths if path.suffix == LORA_SUFFIX and _nameable(path.stem)}
        return {name: file for name, path in sorted(named.items()) if (file := _inside(folder, path)) is not None}

    def check(self, loras: LoraSet) -> None:
        """InvalidField naming the unknown ones and listing what there is."""
        available = self.names()
        unknown = [name for name, _ in loras if name not in available]
        if unknown and self.folder is not None and not self.folder.is_dir():
            raise InvalidField("loras: this server has no LoRAs (its LORA_DIR is not a folder).")
        if unknown:
            listed = ", ".join(available) if available else f"none: the server's LORA_DIR has no {LORA_SUFFIX} files"
            raise InvalidField(f"loras: no LoRA named {', '.join(map(repr, unknown))}; available: {listed}.")

    def version(self, name: str) -> FileVersion:
        """The named file's version now; InvalidField when no file has that name or it cannot be read."""
        path = self.names().get(name)
        if path is None:
            self.check(((name, 1.0),))
            raise _unreadable(name, "it was just removed")  # listed by the check a moment later
        try:
            return version_of(path, follow_links=False)
        except OSError as exc:
            raise _unreadable(name, exc.strerror or str(exc)) from None

    def read(self, name: str) -> tuple[bytes, FileVersion]:
        """The named file's bytes, all of one version; InvalidField when it cannot be read or keeps changing."""
        for attempt in range(READ_ATTEMPTS):
            path = self.version(name).path
            try:
                return read_whole(path, MAX_LORA_BYTES, follow_links=False)
            except FileChanged:
                time.sleep(0.05 * (attempt + 1))
            except OSError as exc:
                raise _unreadable(name, exc.strerror or str(exc)) from None
        raise InvalidField(
            f"loras: the file of LoRA {name!r} kept changing while it was read; try again once it is copied whole."
        )

    def describe(self, model_family: str | None = None) -> list[LoraFile]:
        """The LoRAs a request may use: files whose header says they are LoRAs (for `model_family`, when
        given), with their hashes once known. Why the others are left out is logged
        whenever that changes."""
        files, skipped = [], {}
        for name, path in self.names().items():
            try:
                version = version_of(path, follow_links=False)
            except OSError as exc:
                skipped[name] = exc.strerror or str(exc)
                continue
            header = self._header(version)
            problem = header.problem or _misfit(header.text_width, model_family)
            if problem:
                skipped[name] = problem
                continue
            hashes = HASHES.known(version)
            short_hash = hashes.tensors_sha256[:12] if hashes and hashes.tensors_sha256 else None
            files.append(LoraFile(name, version.size, hashes.sha256 if hashes else None, short_hash))
        self._log_skipped(skipped)
        return files

    def _header(self, version: FileVersion) -> LoraHeader:
        with self._lock:
            header = self._headers.get(version)
        if header is None:
            header = lora_header(version.path)
            with self._lock:
                self._headers[version] = header
                while len(self._headers) > HEADERS_KEPT:  # versions of files rewritten while listed
                    del self._headers[next(iter(self._headers))]
        return header

    def _log_skipped(self, skipped: dict[str, str]) -> None:
        shown = frozenset(f"{name} ({why})" for name, why in skipped.items())
        with self._lock:
            changed, self._skipped = shown != self._skipped, shown
        if changed and shown:
            log.info("LORA_DIR: not listed as LoRAs: %s", "; ".join(sorted(shown)))


def lora_header(path: Path) -> LoraHeader:
    """What the file's header says: a LoRA (and for which text width), or why it is none."""
    try:
        header = read_safetensors_header(path)
    except ValueError as exc:
        return LoraHeader(f"not a .safetensors file: {exc}")
    except OSError as exc:
        return LoraHeader(f"unreadable: {exc.strerror or exc}")
    if not any("lora" in key.lower() for key in header):
        return LoraHeader("holds no LoRA weights")
    return LoraHeader(None, lora_text_width(header))


def lora_text_width(header: dict[str, dict]) -> int | None:
    """The width of the text a LoRA's layers take: the input width of a down weight of a cross-attention
    key projection (`attn2`, `to_k`), or else of a text encoder's query projection."""
    widths: dict[str, int] = {}
    for key, entry in header.items():
        shape = entry.get("shape")
        down = any(part in key for part in ("lora_down", "lora_A", "lora.down"))
        if not (down and isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int)):
            continue
        if "attn2" in key and "to_k" in key:
            widths.setdefault("unet", shape[1])
        elif "q_proj" in key:
            widths.setdefault("text", shape[1])
    return widths.get("unet", widths.get("text"))


def family(text_width: int | None) -> str:
    """A model family in words, by the width of the text its UNet attends to."""
    return FAMILIES.get(text_width, f"a model attending to text {text_width} wide")


def _misfit(lora_width: int | None, model_family: str | None) -> str | None:
    if lora_width is None or model_family is None or family(lora_width) == model_family:
        return None
    return f"made for {family(lora_width)}, not for {model_family}"


def _inside(folder: Path, path: Path) -> Path | None:
    """`path` with its links resolved, when that is a regular file directly in `folder`; else None."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling link, or a loop
        return None
    return target if target.parent == folder and target.suffix == LORA_SUFFIX and target.is_file() else None


def _unreadable(name: str, why: str) -> InvalidField:
    return InvalidField(f"loras: the file of LoRA {name!r} cannot be read ({why}); ask the operator.")


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
        # As pydantic reads every other number field: ASCII digits only (float() also takes '١').
        weight = _WEIGHT.validate_python(weight_text)
    except ValidationError:
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
