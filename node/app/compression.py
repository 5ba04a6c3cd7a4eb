"""Optional update compression (genesis rules.compression): encoding on the trainer's side, with error feedback.

Decoding is in protocol/tensors.py (read_span) and is deterministic: float16 widens exactly, int8 is one float32
multiply by the tensor's scale, top-k scatters float32 values into zeros. Validation and aggregation only ever see
those decoded float32 values, so every validator gets the same model bits whatever the trainer did.

Error feedback (int8 and top-k): what the encoding dropped from an update is added to the trainer's next update
(Seide et al. 2014; Stich et al. 2018), so small coordinates are delayed rather than lost. It lives in this
process only (the trainer's memory), keyed by the author.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import numpy as np
from flnode.protocol.genesis import Genesis, Rules
from flnode.protocol.tensors import (
    COMPRESSION_DTYPES,
    DTYPE,
    F16,
    Q8,
    TOPK,
    blob_size_for,
    encode_items,
    encode_tensors,
    raw_size,
)

from .models import param_spec

Tensors = dict[str, np.ndarray]

_lock = threading.Lock()
_residual: dict[bytes, Tensors] = {}


def update_dtype(rules: Rules) -> str:
    return COMPRESSION_DTYPES[rules.compression]


def topk_count(count: int, fraction: float) -> int:
    """Entries a top-k tensor of `count` elements keeps (at least one of a non-empty tensor)."""
    return min(count, max(1, math.ceil(fraction * count))) if count else 0


def blob_size(genesis: Genesis) -> int:
    """The exact size of every well-formed update blob under the genesis's task and compression (from headers
    alone: a 100M-parameter model is never encoded to learn it)."""
    dtype = update_dtype(genesis.rules)
    items = []
    for name, shape in param_spec(genesis):
        count = math.prod(shape)
        items.append((name, dtype, shape, raw_size(dtype, count, topk_count(count, genesis.rules.compression_topk))))
    return blob_size_for(items)


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices (sorted) of the k largest |x|, ties by lower index; one float32 copy of x at most."""
    if k >= x.size:
        return np.arange(x.size, dtype=np.uint32)
    a = np.abs(x)
    a.partition(x.size - k)  # in place: no second copy
    thr = a[x.size - k]
    del a
    above = np.flatnonzero(np.abs(x) > thr)
    if above.size < k:
        ties = np.flatnonzero(np.abs(x) == thr)[: k - above.size]
        above = np.union1d(above, ties)
    return above.astype(np.uint32)


def encode_update(genesis: Genesis, author: bytes, delta: Mapping[str, np.ndarray]) -> bytes:
    """The update blob of `delta` under the genesis's compression; with int8 and top-k, the author's carried error
    is added first and what this encoding drops is carried to the next update."""
    rules = genesis.rules
    dtype = update_dtype(rules)
    if dtype == DTYPE:
        return encode_tensors(delta)
    items = []
    with _lock:
        carried = _residual.pop(author, {}) if dtype in (Q8, TOPK) else {}
    residual: Tensors = {}
    for name, arr in delta.items():
        x = np.asarray(arr, dtype=np.float32)
        if name in carried and carried[name].shape == x.shape:
            x = x + carried[name]
        flat = np.ascontiguousarray(x).reshape(-1)
        dims = [int(d) for d in x.shape]
        if dtype == F16:
            items.append((name, F16, dims, [flat.astype("<f2")]))
            continue
        if dtype == Q8:
            m = float(np.max(np.abs(flat))) if flat.size else 0.0
            scale = np.float32(m / 127.0) if m > 0 and math.isfinite(m) else np.float32(1.0)
            q = np.clip(np.rint(flat / scale), -127, 127).astype(np.int8)
            items.append((name, Q8, dims, [np.asarray([scale], dtype="<f4"), q]))
            residual[name] = (flat - q.astype(np.float32) * scale).reshape(x.shape)
            continue
        k = topk_count(flat.size, rules.compression_topk)
        idx = _topk(flat, k)
        vals = flat[idx].astype("<f4")
        items.append((name, TOPK, dims, [idx.astype("<u4"), vals]))
        rest = flat.copy() if x is arr else flat  # x is our own sum when an error was carried: reuse it
        rest[idx] = 0.0
        residual[name] = rest.reshape(x.shape)
    if residual:
        with _lock:
            _residual[author] = residual
    return encode_items(items)


def reset(author: bytes | None = None) -> None:
    """Forget carried errors (tests; a node that changes its chain)."""
    with _lock:
        if author is None:
            _residual.clear()
        else:
            _residual.pop(author, None)
