"""API keys: kept in `.env` as the key itself or as `sha256:<hex digest>`, compared by digest.

    python -m service.api_keys     # prints a new random key and the line to put in .env
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

HASH_PREFIX = "sha256:"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def entry_digest(entry: str) -> bytes:
    """The digest a configured entry stands for; ValueError for a malformed `sha256:` entry."""
    if entry.startswith(HASH_PREFIX):
        hex_digest = entry.removeprefix(HASH_PREFIX).lower()
        if not _HEX_DIGEST.fullmatch(hex_digest):
            raise ValueError("a sha256: entry must be followed by 64 hexadecimal characters")
        return bytes.fromhex(hex_digest)
    return digest(entry.encode("utf-8"))


def matches_any(given: bytes, digests: list[bytes]) -> bool:
    """Constant-time over every configured key: timing tells nothing about which one is close."""
    given_digest = digest(given)
    matched = False
    for known in digests:
        matched |= hmac.compare_digest(given_digest, known)
    return matched


def new_key() -> tuple[str, str]:
    """A new random key, and its `sha256:` entry for API_KEY."""
    key = secrets.token_urlsafe(32)
    return key, HASH_PREFIX + hashlib.sha256(key.encode("ascii")).hexdigest()


def main() -> None:
    key, entry = new_key()
    print(f"API key, for the client (shown once; keep it secret): {key}")
    print(f"Add to API_KEY in .env (comma-separated with any others): {entry}")


if __name__ == "__main__":
    main()
