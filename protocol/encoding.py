"""Canonical msgpack: one byte string per value, and decoding refuses every other spelling.

Values are built from None, bool, int, bytes, str and lists (tuples encode as lists). Maps and
floats are not allowed in signed data: fixed-order arrays keep the form unique, and floats only
travel as raw tensor bytes.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import DecodeError, OversizeError

DEFAULT_MAX_SIZE = 1 << 20


def _check(value: Any, depth: int = 0) -> None:
    if depth > 32:
        raise DecodeError("value nested too deeply")
    if value is None or isinstance(value, (bool, int, bytes, str)):
        if isinstance(value, int) and not isinstance(value, bool) and not (-(1 << 63) <= value < (1 << 64)):
            raise DecodeError("integer out of range")
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check(item, depth + 1)
        return
    raise DecodeError(f"type {type(value).__name__} is not allowed in canonical data")


def pack(value: Any) -> bytes:
    """Encode to the canonical form. Raises DecodeError for values outside the canonical model."""
    _check(value)
    return msgpack.packb(value, use_bin_type=True)


def pack_trusted(value: Any) -> bytes:
    """Encode a value built by our own typed constructors (no float/map can appear): the hot path of signing and
    hashing messages skips the recursive type walk. Decoding stays strict either way."""
    return msgpack.packb(value, use_bin_type=True)  # a fresh Packer per call: safe across threads


def unpack(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> Any:
    """Decode canonical bytes; anything else (oversize, trailing bytes, non-minimal forms) is refused."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("expected bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise OversizeError(f"{len(data)} bytes exceeds the cap of {max_size}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=max_size,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not msgpack: {exc.__class__.__name__}") from None
    except Exception as exc:  # msgpack raises a few odd types on hostile input
        raise DecodeError(f"not msgpack: {exc.__class__.__name__}") from None
    _check(value)
    if msgpack.packb(value, use_bin_type=True) != data:
        raise DecodeError("not in canonical form")
    return value


def expect_list(value: Any, length: int, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) != length:
        raise DecodeError(f"{what}: expected an array of {length}")
    return value


def expect_int(value: Any, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DecodeError(f"{what}: expected an integer in [{lo}, {hi}]")
    return value


def expect_bytes(value: Any, what: str, length: int | None = None, max_len: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise DecodeError(f"{what}: expected bytes")
    if length is not None and len(value) != length:
        raise DecodeError(f"{what}: expected {length} bytes, got {len(value)}")
    if max_len is not None and len(value) > max_len:
        raise OversizeError(f"{what}: {len(value)} bytes exceeds {max_len}")
    return value


def expect_str(value: Any, what: str, max_len: int = 256) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise DecodeError(f"{what}: expected a string of at most {max_len} characters")
    return value
