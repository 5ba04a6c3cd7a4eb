"""Bit-exact tensor codec: a named, ordered set of little-endian float32 arrays.

Blob = canonical msgpack of ["flnode/tensors/v1", [[name, "<f4", [dims...], raw bytes], ...]].
Its sha256 is the blob's content address.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .encoding import expect_bytes, expect_int, expect_list, expect_str, pack, unpack
from .errors import DecodeError
from .hashing import digest

TENSOR_MAGIC = "flnode/tensors/v1"
DTYPE = "<f4"
MAX_TENSORS = 1024
MAX_DIMS = 8

Tensors = dict[str, np.ndarray]


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    items = []
    for name, arr in tensors.items():
        a = np.asarray(arr, dtype=np.dtype(DTYPE))  # not ascontiguousarray: it turns 0-d into 1-d
        items.append([name, DTYPE, [int(d) for d in a.shape], a.tobytes()])
    return pack([TENSOR_MAGIC, items])


def decode_tensors(data: bytes, max_size: int = 1 << 30) -> Tensors:
    """Decode a tensor blob; every array is a fresh, writable float32 copy."""
    value = unpack(data, max_size=max_size)
    magic, items = expect_list(value, 2, "tensor blob")
    if magic != TENSOR_MAGIC:
        raise DecodeError("tensor blob: wrong magic")
    if not isinstance(items, list) or len(items) > MAX_TENSORS:
        raise DecodeError("tensor blob: bad tensor list")
    out: Tensors = {}
    for item in items:
        name, dtype, shape, raw = expect_list(item, 4, "tensor")
        name = expect_str(name, "tensor name")
        if name in out:
            raise DecodeError(f"tensor blob: duplicate tensor {name!r}")
        if dtype != DTYPE:
            raise DecodeError(f"tensor {name!r}: dtype {dtype!r} is not {DTYPE}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS:
            raise DecodeError(f"tensor {name!r}: bad shape")
        dims = [expect_int(d, "dimension", 0, 1 << 31) for d in shape]
        raw = expect_bytes(raw, "tensor data")
        count = 1
        for d in dims:
            count *= d
        if count * 4 != len(raw):
            raise DecodeError(f"tensor {name!r}: {len(raw)} bytes do not fit shape {dims}")
        out[name] = np.frombuffer(raw, dtype=np.dtype(DTYPE)).reshape(dims).astype(np.float32, copy=True)
    return out


def tensors_hash(tensors: Mapping[str, np.ndarray]) -> bytes:
    return digest(encode_tensors(tensors))
