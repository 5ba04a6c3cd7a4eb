"""Bit-exact tensor codec: a named, ordered set of little-endian float32 arrays.

Blob = canonical msgpack of ["flnode/tensors/v1", [[name, "<f4", [dims...], raw bytes], ...]].
Its sha256 is the blob's content address.

Large models: a blob is parsed into a layout (name, shape, byte offset of its raw data) by reading only the
msgpack headers, so a 400 MB update is validated and aggregated a chunk at a time from a file or a buffer, never
decoded whole. The parser accepts exactly what `unpack` + the checks below accept: every byte outside the raw
tensor data is compared to the canonical encoding of the values it parsed (which is the re-encode check of
`unpack`, without a second copy of the data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .encoding import pack
from .errors import DecodeError

TENSOR_MAGIC = "flnode/tensors/v1"
DTYPE = "<f4"
# Compressed update encodings (genesis rules.compression); each decodes to float32 the same way everywhere:
#   "<f2"  : little-endian float16, widened exactly to float32
#   "q8"   : a little-endian float32 scale, then one int8 per element; value = float32(q) * scale (one IEEE multiply)
#   "topk" : k strictly increasing little-endian uint32 indices, then k float32 values; every other element is 0
F16, Q8, TOPK = "<f2", "q8", "topk"
COMPRESSION_DTYPES = {"none": DTYPE, "float16": F16, "int8": Q8, "topk": TOPK}
MAX_TENSORS = 1024
MAX_DIMS = 8
MAX_NAME = 256  # expect_str's default, which the codec always used

Tensors = dict[str, np.ndarray]


class BlobReader(Protocol):
    """Random access to a blob's bytes: an in-memory blob (BytesReader) or a file (the store's FileReader)."""

    size: int

    def read_at(self, offset: int, n: int) -> bytes | memoryview:
        """Exactly n bytes from offset (fewer only past the end)."""
        ...


class BytesReader:
    """A blob already in memory; reads are zero-copy views."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self.size = len(self._view)

    def read_at(self, offset: int, n: int) -> memoryview:
        return self._view[offset : offset + n]


def as_reader(blob: bytes | bytearray | memoryview | BlobReader) -> BlobReader:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return BytesReader(blob)
    return blob


@dataclass(frozen=True)
class TensorSpan:
    name: str
    shape: tuple[int, ...]
    offset: int  # of the raw data in the blob
    count: int  # elements (of the dense tensor)
    dtype: str = DTYPE
    k: int = 0  # topk: stored elements


def raw_size(dtype: str, count: int, k: int = 0) -> int:
    """Bytes of a tensor's raw data in an encoding (topk: with k stored elements)."""
    return {DTYPE: 4 * count, F16: 2 * count, Q8: 4 + count, TOPK: 8 * k}[dtype]


class _Cursor:
    """Sequential reads of the small header pieces of a blob, through a window (the raw data is skipped)."""

    WINDOW = 1 << 16

    def __init__(self, reader: BlobReader) -> None:
        self.r = reader
        self.pos = 0
        self._buf = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.r.size:
            raise DecodeError("tensor blob: truncated")
        lo = self.pos - self._at
        if lo < 0 or lo + n > len(self._buf):
            self._at = self.pos
            self._buf = bytes(self.r.read_at(self.pos, max(n, min(self.WINDOW, self.r.size - self.pos))))
            lo = 0
        out = self._buf[lo : lo + n]
        if len(out) != n:
            raise DecodeError("tensor blob: truncated")
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def array_header(self) -> int:
        b = self.take(1)[0]
        if 0x90 <= b <= 0x9F:
            return b & 0x0F
        if b == 0xDC:
            return self.uint(2)
        if b == 0xDD:
            return self.uint(4)
        raise DecodeError("tensor blob: expected an array")

    def str_(self) -> str:
        b = self.take(1)[0]
        if 0xA0 <= b <= 0xBF:
            n = b & 0x1F
        elif b == 0xD9:
            n = self.uint(1)
        elif b == 0xDA:
            n = self.uint(2)
        elif b == 0xDB:
            n = self.uint(4)
        else:
            raise DecodeError("tensor blob: expected a string")
        if n > 4 * MAX_NAME + 16:
            raise DecodeError("tensor blob: string too long")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("tensor blob: bad utf-8") from None

    def int_(self) -> int:
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        sizes = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
        if b in sizes:
            return self.uint(sizes[b])
        ssizes = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
        if b in ssizes:
            return int.from_bytes(self.take(ssizes[b]), "big", signed=True)
        raise DecodeError("tensor blob: expected an integer")

    def bin_header(self) -> int:
        b = self.take(1)[0]
        if b == 0xC4:
            return self.uint(1)
        if b == 0xC5:
            return self.uint(2)
        if b == 0xC6:
            return self.uint(4)
        raise DecodeError("tensor blob: expected bytes")

    def expect(self, start: int, canonical: bytes) -> None:
        """The bytes parsed since `start` must be the canonical spelling (what unpack's re-encode demands)."""
        if self.pos - start != len(canonical):
            raise DecodeError("tensor blob: not in canonical form")
        if self._at <= start and self.pos <= self._at + len(self._buf):
            got = self._buf[start - self._at : self.pos - self._at]
        else:
            got = bytes(self.r.read_at(start, self.pos - start))
        if got != canonical:
            raise DecodeError("tensor blob: not in canonical form")


def _array_header(n: int) -> bytes:
    """msgpack's minimal array header (what packb writes)."""
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    """msgpack's minimal bin header (use_bin_type=True)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    return b"\xc5" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xc6" + n.to_bytes(4, "big")


def tensor_layout(blob: bytes | bytearray | memoryview | BlobReader, max_size: int = 1 << 30,
                  dtypes: frozenset[str] = frozenset({DTYPE})) -> list[TensorSpan]:
    """Where each tensor's raw data lies, reading only headers. Raises DecodeError for exactly the blobs
    decode_tensors refuses (wrong structure, non-canonical spelling, bad dtype/shape/size, trailing bytes).
    `dtypes`: the encodings allowed (only float32 unless a genesis compresses updates); topk indices are read
    and must be strictly increasing and within the tensor."""
    r = as_reader(blob)
    if r.size > max_size:
        raise DecodeError(f"tensor blob: {r.size} bytes exceeds the cap of {max_size}")
    c = _Cursor(r)
    s = c.pos
    if c.array_header() != 2:
        raise DecodeError("tensor blob: expected an array of 2")
    c.expect(s, _array_header(2))
    s = c.pos
    if c.str_() != TENSOR_MAGIC:
        raise DecodeError("tensor blob: wrong magic")
    c.expect(s, pack(TENSOR_MAGIC))
    s = c.pos
    n = c.array_header()
    if n > MAX_TENSORS:
        raise DecodeError("tensor blob: bad tensor list")
    c.expect(s, _array_header(n))
    out: list[TensorSpan] = []
    names: set[str] = set()
    for _ in range(n):
        s = c.pos
        if c.array_header() != 4:
            raise DecodeError("tensor: expected an array of 4")
        name = c.str_()
        if len(name) > MAX_NAME:
            raise DecodeError("tensor name: too long")
        if name in names:
            raise DecodeError(f"tensor blob: duplicate tensor {name!r}")
        names.add(name)
        dtype = c.str_()
        if dtype not in dtypes:
            raise DecodeError(f"tensor {name!r}: dtype {dtype!r} is not allowed here")
        ndims = c.array_header()
        if ndims > MAX_DIMS:
            raise DecodeError(f"tensor {name!r}: bad shape")
        dims = [c.int_() for _ in range(ndims)]
        if any(not 0 <= d <= 1 << 31 for d in dims):
            raise DecodeError(f"tensor {name!r}: bad dimension")
        raw = c.bin_header()
        c.expect(s, _array_header(4) + pack(name) + pack(dtype) + pack(dims) + _bin_header(raw))
        count = 1
        for d in dims:
            count *= d
        k = raw // 8 if dtype == TOPK and raw % 8 == 0 and raw // 8 <= count else 0
        if raw_size(dtype, count, k) != raw:
            raise DecodeError(f"tensor {name!r}: {raw} bytes do not fit shape {dims}")
        if c.pos + raw > r.size:
            raise DecodeError("tensor blob: truncated")
        span = TensorSpan(name, tuple(dims), c.pos, count, dtype, k)
        if dtype == TOPK:
            idx = topk_indices(r, span)
            if k and (int(idx[-1]) >= count or (k > 1 and not bool(np.all(np.diff(idx.astype(np.int64)) > 0)))):
                raise DecodeError(f"tensor {name!r}: topk indices not increasing within the tensor")
        out.append(span)
        c.pos += raw
    if c.pos != r.size:
        raise DecodeError("tensor blob: trailing bytes")
    return out


def topk_indices(reader: BlobReader, span: TensorSpan) -> np.ndarray:
    return np.frombuffer(reader.read_at(span.offset, 4 * span.k), dtype=np.dtype("<u4"), count=span.k)


def read_span(reader: BlobReader, span: TensorSpan, start: int = 0, stop: int | None = None,
              index: np.ndarray | None = None) -> np.ndarray:
    """Elements [start, stop) of a tensor, flat, as float32 (a view when the reader is in memory and the data is
    float32). Compressed encodings are decoded here, deterministically. `index`: a topk tensor's indices, if
    already read."""
    stop = span.count if stop is None else stop
    n = stop - start
    if span.dtype == DTYPE:
        return np.frombuffer(reader.read_at(span.offset + 4 * start, 4 * n), dtype=np.dtype(DTYPE), count=n)
    if span.dtype == F16:
        raw = reader.read_at(span.offset + 2 * start, 2 * n)
        return np.frombuffer(raw, dtype=np.dtype(F16), count=n).astype(np.float32)  # exact widening
    if span.dtype == Q8:
        scale = np.frombuffer(reader.read_at(span.offset, 4), dtype=np.dtype(DTYPE), count=1)[0]
        q = np.frombuffer(reader.read_at(span.offset + 4 + start, n), dtype=np.int8, count=n)
        return q.astype(np.float32) * np.float32(scale)  # one correctly rounded float32 multiply each
    idx = topk_indices(reader, span) if index is None else index
    lo, hi = (int(x) for x in np.searchsorted(idx, [start, stop]))
    out = np.zeros(n, dtype=np.float32)
    if hi > lo:
        vals = reader.read_at(span.offset + 4 * span.k + 4 * lo, 4 * (hi - lo))
        out[idx[lo:hi].astype(np.int64) - start] = np.frombuffer(vals, dtype=np.dtype(DTYPE), count=hi - lo)
    return out


def decode_tensors(data: bytes | bytearray | memoryview | BlobReader, max_size: int = 1 << 30) -> Tensors:
    """Decode a tensor blob; every array is a fresh, writable float32 copy (the only copy made)."""
    r = as_reader(data)
    out: Tensors = {}
    for span in tensor_layout(r, max_size):
        out[span.name] = read_span(r, span).reshape(span.shape).astype(np.float32, copy=True)
    return out


def _segments(tensors: Mapping[str, np.ndarray]) -> Iterator[bytes | memoryview]:
    """The canonical encoding as a sequence of pieces (headers, then each tensor's raw bytes, uncopied)."""
    arrays = [(name, np.asarray(arr, dtype=np.dtype(DTYPE))) for name, arr in tensors.items()]
    yield _array_header(2) + pack(TENSOR_MAGIC) + _array_header(len(arrays))
    for name, a in arrays:
        dims = [int(d) for d in a.shape]
        yield _array_header(4) + pack(name) + pack(DTYPE) + pack(dims) + _bin_header(a.size * 4)
        c = a if a.flags.c_contiguous else np.ascontiguousarray(a)
        yield memoryview(c.reshape(-1)).cast("B") if c.size else b""  # type: ignore[arg-type]


def encode_items(items: Iterable[tuple[str, str, Sequence[int], Sequence[bytes | memoryview]]]) -> bytes:
    """A blob from (name, dtype, dims, raw pieces) items: the compressed update encodings (node/app/compression)."""
    items = list(items)
    segs: list[bytes | memoryview] = [_array_header(2) + pack(TENSOR_MAGIC) + _array_header(len(items))]
    for name, dtype, dims, pieces in items:
        segs.append(_array_header(4) + pack(name) + pack(dtype) + pack([int(d) for d in dims])
                    + _bin_header(sum(len(memoryview(p).cast("B")) for p in pieces)))
        segs.extend(memoryview(p).cast("B") for p in pieces)
    return b"".join(segs)


def blob_size_for(items: Iterable[tuple[str, str, Sequence[int], int]]) -> int:
    """The size of a blob of (name, dtype, dims, raw bytes) items, computed from headers alone (no encoding)."""
    items = list(items)
    n = len(_array_header(2) + pack(TENSOR_MAGIC) + _array_header(len(items)))
    for name, dtype, dims, raw in items:
        n += len(_array_header(4) + pack(name) + pack(dtype) + pack([int(d) for d in dims]) + _bin_header(raw)) + raw
    return n


def encoded_size(tensors: Mapping[str, np.ndarray]) -> int:
    return sum(len(s) for s in _segments(tensors))


def write_tensors(tensors: Mapping[str, np.ndarray], write: Callable[[bytes | memoryview], object]) -> None:
    """Stream the canonical encoding to `write` without building it (a model blob straight to a file)."""
    for seg in _segments(tensors):
        write(seg)


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The canonical blob in one copy (join sizes it first; no per-tensor tobytes, no second msgpack copy)."""
    return b"".join(_segments(tensors))


def tensors_hash(tensors: Mapping[str, np.ndarray]) -> bytes:
    """sha256 of the canonical blob, fed piece by piece (no encoded copy)."""
    h = hashlib.sha256()
    for seg in _segments(tensors):
        h.update(seg)
    return h.digest()



class StreamedTensors:
    """A blob's tensors read on demand, a flat chunk at a time (validation and aggregation of large updates).
    Iterating gives the names in blob order, like a decoded dict."""

    def __init__(self, reader: BlobReader, spans: list[TensorSpan]) -> None:
        self.reader = reader
        self.spans = {s.name: s for s in spans}
        self._index: dict[str, np.ndarray] = {}  # topk indices, read once (k x 4 bytes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.spans[name].shape

    def flat(self, name: str, start: int, stop: int) -> np.ndarray:
        span = self.spans[name]
        index = None
        if span.dtype == TOPK:
            index = self._index.get(name)
            if index is None:
                index = self._index[name] = np.array(topk_indices(self.reader, span))
        return read_span(self.reader, span, start, stop, index)

    def decode(self) -> Tensors:
        return {n: self.flat(n, 0, s.count).reshape(s.shape).astype(np.float32, copy=True)
                for n, s in self.spans.items()}
