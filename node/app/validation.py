"""What a validator checks of an update before it counts. Every rejection has a reason code."""

from __future__ import annotations

import math
from collections.abc import Iterator
from enum import StrEnum

import numpy as np
from flnode.protocol.errors import ProtocolError
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import UpdateAnnouncement
from flnode.protocol.tensors import COMPRESSION_DTYPES, BlobReader, StreamedTensors, as_reader, tensor_layout

from .dp import update_bound_for as dp_update_bound
from .dp import update_floor_for as dp_update_floor
from .limits import param_spec, samples_cap, update_blob_size
from .membership import declared_samples, trains_at
from .state import AppState

Tensors = dict[str, np.ndarray]


class Reason(StrEnum):
    NOT_PARTICIPANT = "not_participant"
    BAD_SIGNATURE = "bad_signature"
    WRONG_HEIGHT = "wrong_height"
    WRONG_BASE = "wrong_base"
    EXCLUDED = "excluded"
    OVERSIZE = "oversize"
    SAMPLES_OVER_CAP = "samples_over_cap"
    WRONG_BLOB_SIZE = "wrong_blob_size"
    SIZE_MISMATCH = "size_mismatch"
    MALFORMED_BLOB = "malformed_blob"
    WRONG_SHAPE = "wrong_shape"
    NON_FINITE = "non_finite"
    NORM_BOUND = "norm_bound"
    EQUIVOCATION = "equivocation"
    OUTLIER = "outlier"
    DP_CLIP_BOUND = "dp_clip_bound"  # participant-level DP: norm above the clip norm plus the noise's bound
    DP_NOISE_MISSING = "dp_noise_missing"  # participant-level DP: norm too small to carry the noise share
    PRIVACY_BUDGET_SPENT = "privacy_budget_spent"  # one more round would exceed the author's epsilon budget


# The author's fault, provable from its signature and the blob: these cost reputation.
PENALISED = frozenset(
    {Reason.SIZE_MISMATCH, Reason.MALFORMED_BLOB, Reason.WRONG_SHAPE, Reason.NON_FINITE, Reason.NORM_BOUND,
     Reason.EQUIVOCATION, Reason.OUTLIER, Reason.DP_CLIP_BOUND, Reason.DP_NOISE_MISSING,
     Reason.PRIVACY_BUDGET_SPENT}
)

def check_announcement(
    genesis: Genesis, state: AppState, ann: UpdateAnnouncement, *, exact_size: bool = False
) -> Reason | None:
    """Cheap checks, no blob needed. A block containing an announcement failing these is invalid (the exact
    blob size is checked only with exact_size: in a block a wrong size is the author's fault, penalised)."""
    if not trains_at(genesis, state, ann.author, state.height + 1):  # genesis validators, admitted trainers
        return Reason.NOT_PARTICIPANT
    if ann.height != state.height + 1:
        return Reason.WRONG_HEIGHT
    if ann.base_model_hash != state.model_hash:
        return Reason.WRONG_BASE
    if state.excluded(ann.author, genesis.rules.rewards.exclude_below):
        return Reason.EXCLUDED
    if ann.blob_size > genesis.rules.max_blob_bytes:
        return Reason.OVERSIZE
    if ann.num_samples > samples_cap(genesis, ann.author, declared_samples(state, ann.author)):
        return Reason.SAMPLES_OVER_CAP
    if exact_size and ann.blob_size != update_blob_size(genesis):
        return Reason.WRONG_BLOB_SIZE
    if not ann.verify(genesis.chain_id):
        return Reason.BAD_SIGNATURE
    return None


def check_announcement_admission(genesis: Genesis, state: AppState, ann: UpdateAnnouncement) -> Reason | None:
    """What a node checks before it pools, relays or proposes an announcement (no blob): participant, height,
    base model, not excluded, samples within the author's cap, blob size exactly the task's update size,
    signature. None if admissible, else the reason (a str)."""
    return check_announcement(genesis, state, ann, exact_size=True)


_BLOCK = 4096


def fixed_order_sum_squares(values: np.ndarray) -> float:
    """Sum of squares whose bits do not depend on the numpy build, SIMD width or thread count.

    float32 squares are exact in float64 (other inputs: each square is correctly rounded). They are laid out as
    rows of 4096 and the rows are added in order with elementwise adds (each correctly rounded; no reduction whose
    order numpy may choose), then the 4096 column sums once more with math.fsum (exactly rounded)."""
    sq = np.square(np.asarray(values).ravel().astype(np.float64))
    if sq.size <= _BLOCK:  # one row: its padding would only add exact zeros to the fsum
        return math.fsum(sq.tolist())
    pad = (-sq.size) % _BLOCK
    if pad:
        sq = np.concatenate([sq, np.zeros(pad, dtype=np.float64)])
    if sq.size == 0:
        return 0.0
    m = sq.reshape(-1, _BLOCK)
    acc = m[0].copy()
    for row in m[1:]:  # contiguous rows, added in order
        acc += row
    return math.fsum(acc.tolist())


def l2_norm_exact(tensors: Tensors) -> float:
    """The update's L2 norm, computed the same way on every machine (it decides acceptance)."""
    return math.sqrt(math.fsum(fixed_order_sum_squares(t) for t in tensors.values()))


# Elements per chunk when a tensor is read from its blob: a multiple of _BLOCK, so chunked sums of squares add
# the same 4096-wide rows in the same order as the whole-tensor computation (bit-identical), 1 MiB of float32.
CHUNK = 64 * _BLOCK


def chunks(count: int, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    for start in range(0, count, size):
        yield start, min(count, start + size)


class SumSquares:
    """fixed_order_sum_squares fed in pieces: every piece but the last must be a multiple of 4096 long. Adding a
    row to zeros gives the row itself (squares are >= 0, never -0.0), and the zero padding of the last row adds
    +0.0, so the bits equal the whole-array computation."""

    def __init__(self) -> None:
        self.acc = np.zeros(_BLOCK, dtype=np.float64)
        self.used = 0  # acc[used:] is still all +0.0: the fsum leaves it out (same bits, less work)

    def add(self, values64: np.ndarray) -> None:
        sq = np.square(values64)
        full = sq.size - sq.size % _BLOCK
        acc = self.acc
        for start in range(0, full, _BLOCK):
            acc += sq[start : start + _BLOCK]
        if full < sq.size:
            acc[: sq.size - full] += sq[full:]
        self.used = _BLOCK if full else max(self.used, sq.size)

    def total(self) -> float:
        return math.fsum(self.acc[: self.used].tolist())


def scan_update(tensors: StreamedTensors) -> tuple[bool, float]:
    """(all finite, exact L2 norm) in one pass over the blob, a chunk at a time; the norm is that of
    l2_norm_exact to the bit, and 0.0 when a non-finite value was met (the pass stops there)."""
    per_tensor = []
    for name in tensors:
        s = SumSquares()
        for a, b in chunks(tensors.spans[name].count):
            x = tensors.flat(name, a, b)
            if not np.isfinite(x).all():
                return False, 0.0
            s.add(x.astype(np.float64))
        per_tensor.append(s.total())
    return True, math.sqrt(math.fsum(per_tensor))


def check_update_streamed(
    genesis: Genesis, state: AppState, ann: UpdateAnnouncement, blob: bytes | BlobReader
) -> tuple[StreamedTensors | None, Reason | None]:
    """check_update without decoding: the blob (bytes or a file reader) is parsed by its headers and scanned a
    chunk at a time; the accepted update is returned as StreamedTensors for chunked aggregation. Same reasons,
    in the same order, as check_update."""
    r = as_reader(blob)
    if r.size != ann.blob_size:
        return None, Reason.SIZE_MISMATCH
    try:
        spans = tensor_layout(r, max_size=genesis.rules.max_blob_bytes,
                              dtypes=frozenset({COMPRESSION_DTYPES[genesis.rules.compression]}))
    except ProtocolError:
        return None, Reason.MALFORMED_BLOB
    if [(s.name, s.shape) for s in spans] != param_spec(genesis):
        return None, Reason.WRONG_SHAPE
    tensors = StreamedTensors(r, spans)
    finite, norm = scan_update(tensors)
    if not finite:
        return None, Reason.NON_FINITE
    if norm > genesis.rules.norm_bound:
        return None, Reason.NORM_BOUND
    if norm > dp_update_bound(genesis):
        return None, Reason.DP_CLIP_BOUND
    if norm < dp_update_floor(genesis):
        return None, Reason.DP_NOISE_MISSING
    return tensors, None


def check_update(genesis: Genesis, state: AppState, ann: UpdateAnnouncement, blob: bytes) -> tuple[Tensors | None, Reason | None]:
    """check_update_streamed, with the accepted update decoded (small models, tools and tests)."""
    tensors, why = check_update_streamed(genesis, state, ann, blob)
    return (None if tensors is None else tensors.decode()), why
