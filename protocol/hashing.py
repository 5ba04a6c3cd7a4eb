"""Content addressing: sha256 everywhere, 32 raw bytes, shown as hex."""

from __future__ import annotations

import hashlib

HASH_LEN = 32
ZERO_HASH = b"\x00" * HASH_LEN


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def short(h: bytes | None, n: int = 12) -> str:
    """Human-readable prefix for logs and tables."""
    return "nil" if h is None else h.hex()[:n]
