"""Aggregation rules as small strategy classes, deterministic to the bit on every machine.

Updates arrive sorted by announcement hash. Accumulation is elementwise in float64, in that fixed order (IEEE
elementwise add/multiply is correctly rounded, so the result cannot depend on SIMD width or thread count); no
np.sum/np.dot/BLAS reduction touches a value that enters the model. Selection scores (Multi-Krum) use exactly
rounded sums (math.fsum) and a stable sort with the update hash as the tie-break.

Rules with history compose in front of, or parametrise, a rule: reputation weighting, then a mixing
step (bucketing, nearest-neighbour mixing) whose outputs are derived deltas computed a chunk at a time, then the
rule (centered clipping may start from the previous aggregate step, the momentum). build_aggregator assembles
them from the genesis rules and what the caller takes from the committed state: the seed (the previous state's
hash), the authors' reputation and the previous model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeAlias

import numpy as np
from flnode.protocol.genesis import Rules
from flnode.protocol.hashing import digest
from flnode.protocol.tensors import StreamedTensors

from .validation import SumSquares, chunks

Tensors = dict[str, np.ndarray]
Delta: TypeAlias = "dict[str, np.ndarray] | StreamedTensors | MixedDelta"
# The aggregated delta of coordinates [start, stop) of one tensor, float64, flat.
ChunkFn = Callable[[str, int, int], np.ndarray]


@dataclass(frozen=True)
class WeightedUpdate:
    key: bytes  # announcement hash: the canonical order and the tie-break
    author: bytes
    delta: Delta  # decoded arrays, or the blob read a chunk at a time (large models)
    num_samples: int


@dataclass(frozen=True)
class AggregationResult:
    new_model: Tensors
    outliers: frozenset[bytes]  # authors whose updates the rule left out


# Every rule works coordinate chunk by coordinate chunk across the updates: all values of a coordinate meet in
# one chunk, and every operation is elementwise (or a fixed-order row sum), so chunking changes no bit while
# memory stays at (updates x chunk) instead of (updates x model).


@dataclass(frozen=True)
class MixedDelta:
    """A weighted mean of other updates' deltas, evaluated a chunk at a time in the sources' fixed order
    (what bucketing and nearest-neighbour mixing hand to the rule behind them)."""

    sources: tuple[Delta, ...]
    weights: tuple[float, ...]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources[0])

    def flat(self, name: str, start: int, stop: int) -> np.ndarray:
        total = math.fsum(self.weights)
        acc = np.zeros(stop - start, dtype=np.float64)
        for d, w in zip(self.sources, self.weights, strict=True):  # fixed order, elementwise
            acc += (w / total) * _flat64(d, name, start, stop)
        return acc


def _flat64(d: Delta, name: str, start: int, stop: int) -> np.ndarray:
    if isinstance(d, MixedDelta):
        return d.flat(name, start, stop)
    if isinstance(d, StreamedTensors):
        return d.flat(name, start, stop).astype(np.float64)
    return np.asarray(d[name]).reshape(-1)[start:stop].astype(np.float64)


def _count(d: Delta, name: str) -> int:
    if isinstance(d, MixedDelta):
        return _count(d.sources[0], name)
    if isinstance(d, StreamedTensors):
        return d.spans[name].count
    return int(np.asarray(d[name]).size)


def _shape(d: Delta, name: str) -> tuple[int, ...]:
    if isinstance(d, MixedDelta):
        return _shape(d.sources[0], name)
    if isinstance(d, StreamedTensors):
        return d.shape(name)
    return tuple(np.asarray(d[name]).shape)


class Aggregator(Protocol):
    name: str

    def prepare(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[ChunkFn, frozenset[bytes]]:
        """A function giving the aggregated delta chunk by chunk, and the authors left out."""
        ...


def combine(agg: Aggregator, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[dict[str, np.ndarray], frozenset[bytes]]:
    """The whole aggregated delta (float64) and the authors left out (tools and tests; aggregate streams)."""
    fn, outliers = agg.prepare(updates, rules)
    first = _ordered(updates)[0].delta
    out = {}
    for name in first:
        n = _count(first, name)
        out[name] = (np.concatenate([fn(name, a, b) for a, b in chunks(n)]) if n else np.zeros(0)).reshape(
            _shape(first, name))
    return out, outliers


def _ordered(updates: Sequence[WeightedUpdate]) -> list[WeightedUpdate]:
    return sorted(updates, key=lambda u: u.key)


def _weighted_mean(updates: Sequence[WeightedUpdate], weights: Sequence[float]) -> ChunkFn:
    total = math.fsum(weights)
    if total <= 0:  # every weight zero (Multi-Krum keeping only reputation-0 authors): the plain mean, no crash
        weights, total = [1.0] * len(updates), float(len(updates))

    def chunk(name: str, start: int, stop: int) -> np.ndarray:
        acc = np.zeros(stop - start, dtype=np.float64)
        for u, w in zip(updates, weights, strict=True):  # fixed order, elementwise
            acc += (w / total) * _flat64(u.delta, name, start, stop)
        return acc

    return chunk


class FedAvg:
    """Weights = sample counts (McMahan et al.)."""

    name = "fedavg"

    def prepare(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[ChunkFn, frozenset[bytes]]:
        ups = _ordered(updates)
        return _weighted_mean(ups, [float(u.num_samples) for u in ups]), frozenset()


def _sorted_stack(updates: Sequence[WeightedUpdate], name: str, start: int, stop: int) -> np.ndarray:
    return np.sort(np.stack([_flat64(u.delta, name, start, stop) for u in updates]), axis=0, kind="stable")


class Median:
    """Coordinate-wise median (Yin et al. 2018); for an even count the mean of the two middle values."""

    name = "median"

    def prepare(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[ChunkFn, frozenset[bytes]]:
        ups = _ordered(updates)
        n = len(ups)

        def chunk(name: str, start: int, stop: int) -> np.ndarray:
            s = _sorted_stack(ups, name, start, stop)
            return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * 0.5

        return chunk, frozenset()


class TrimmedMean:
    """Coordinate-wise mean after dropping the k largest and k smallest values, k = floor(trim_fraction * n)."""

    name = "trimmed_mean"

    def prepare(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[ChunkFn, frozenset[bytes]]:
        ups = _ordered(updates)
        n = len(ups)
        k = min(int(math.floor(rules.trim_fraction * n)), (n - 1) // 2)

        def chunk(name: str, start: int, stop: int) -> np.ndarray:
            s = _sorted_stack(ups, name, start, stop)
            acc = np.zeros(stop - start, dtype=np.float64)
            for row in s[k : n - k]:  # fixed order, elementwise
                acc += row
            return acc / (n - 2 * k)

        return chunk, frozenset()


def _sq_distances(ups: Sequence[WeightedUpdate]) -> list[list[float]]:
    """Pairwise squared distances, one pass over the updates a chunk at a time: per tensor, the per-element
    differences (correctly rounded) go through the same fixed-order row sums as fixed_order_sum_squares, then
    math.fsum over tensors (exactly rounded)."""
    n = len(ups)
    per_pair: list[list[list[float]]] = [[[] for _ in range(n)] for _ in range(n)]
    for name in ups[0].delta:
        sums = {(i, j): SumSquares() for i in range(n) for j in range(i + 1, n)}
        for a, b in chunks(_count(ups[0].delta, name)):
            xs = [_flat64(u.delta, name, a, b) for u in ups]
            for (i, j), s in sums.items():
                s.add(xs[i] - xs[j])
        for (i, j), s in sums.items():
            per_pair[i][j].append(s.total())
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            dist[i][j] = dist[j][i] = math.fsum(per_pair[i][j])
    return dist


class MultiKrum:
    """Multi-Krum (Blanchard et al. 2017): score each update by the sum of squared distances to its n - f - 2
    nearest neighbours, keep the m best (m = krum_select or n - f), FedAvg them. The rest are outliers."""

    name = "multi_krum"

    def prepare(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[ChunkFn, frozenset[bytes]]:
        ups = _ordered(updates)
        n = len(ups)
        f = rules.krum_byzantine
        m = rules.krum_select or max(1, n - f)
        if n <= 2 * f + 2 or m >= n:
            return FedAvg().prepare(ups, rules)[0], frozenset()
        dist = _sq_distances(ups)
        k = n - f - 2
        scores = []
        for i in range(n):
            near = sorted(dist[i][j] for j in range(n) if j != i)[:k]
            scores.append((math.fsum(near), ups[i].key, i))
        scores.sort()  # exact floats, then the update hash: a total order
        keep = sorted(i for _, _, i in scores[:m])
        chosen = [ups[i] for i in keep]
        outliers = frozenset(ups[i].author for i in range(n) if i not in keep)
        return _weighted_mean(chosen, [float(u.num_samples) for u in chosen]), outliers


class CenteredClip:
    """Centered clipping (Karimireddy et al. 2021): start from the coordinate-wise median v (or from `reference`,
    the previous committed aggregate: CenteredClipMomentum), then `iterations` times
    v <- v + (1/n) sum_i (x_i - v) * min(1, tau / ||x_i - v||), with tau the given radius, or (tau 0, the
    default) the lower median of the distances ||x_i - v_0||. Unweighted, as in the paper (a sample count is a
    claim). Distances go through the fixed-order row sums of fixed_order_sum_squares per tensor and math.fsum
    over tensors; the sums over updates are elementwise in the canonical order, so the result is the same to the
    bit everywhere. It holds the centre (one float64 model) while it iterates; it leaves nobody out. Without a
    reference, tau or iterations it is the stateless rule of the first release, bit for bit."""

    name = "centered_clip"
    iterations = 3

    def __init__(self, reference: ChunkFn | None = None, tau: float = 0.0, iterations: int | None = None) -> None:
        self.reference = reference
        self.tau = float(tau)
        if iterations is not None:
            self.iterations = int(iterations)

    def _start(self, ups: Sequence[WeightedUpdate], rules: Rules, sizes: dict[str, int]) -> dict[str, np.ndarray]:
        ref = self.reference
        if ref is not None:
            return {name: np.concatenate([ref(name, a, b) for a, b in chunks(c)]) if c else np.zeros(0)
                    for name, c in sizes.items()}
        med, _ = Median().prepare(ups, rules)  # no reference: the first round
        return {name: np.concatenate([med(name, a, b) for a, b in chunks(c)]) if c else np.zeros(0)
                for name, c in sizes.items()}

    def prepare(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[ChunkFn, frozenset[bytes]]:
        ups = _ordered(updates)
        n = len(ups)
        first = ups[0].delta
        sizes = {name: _count(first, name) for name in first}
        centre = self._start(ups, rules, sizes)

        def distances() -> list[float]:
            per: list[list[float]] = [[] for _ in range(n)]
            for name, c in sizes.items():
                sums = [SumSquares() for _ in range(n)]
                for a, b in chunks(c):
                    v = centre[name][a:b]
                    for i, u in enumerate(ups):
                        sums[i].add(_flat64(u.delta, name, a, b) - v)
                for i in range(n):
                    per[i].append(sums[i].total())
            return [math.sqrt(math.fsum(p)) for p in per]

        d0 = distances()
        tau = self.tau if self.tau > 0 else sorted(d0)[(n - 1) // 2]
        for it in range(self.iterations):
            d = d0 if it == 0 else distances()
            scale = [1.0 if di <= tau else tau / di for di in d]  # di > tau >= 0: no division by zero
            for name, c in sizes.items():
                for a, b in chunks(c):
                    v = centre[name][a:b]
                    acc = np.zeros(b - a, dtype=np.float64)
                    for u, s in zip(ups, scale, strict=True):  # fixed order, elementwise
                        acc += s * (_flat64(u.delta, name, a, b) - v)
                    centre[name][a:b] = v + acc / n

        def chunk(name: str, start: int, stop: int) -> np.ndarray:
            return centre[name][start:stop].copy()

        return chunk, frozenset()


class CenteredClipMomentum(CenteredClip):
    """Centered clipping around the previous committed aggregate step (Karimireddy, He & Jaggi 2021, "Learning
    from History"): the caller passes it as `reference` (model_step of the two last committed models); without
    one (the first round) it starts from the median."""

    name = "centered_clip_momentum"


# ---- pre-aggregation steps in front of any rule ----


def _bucket_key(members: Sequence[WeightedUpdate]) -> bytes:
    return digest(b"flnode/bucket/v1" + b"".join(u.key for u in members))


def bucket_order(updates: Sequence[WeightedUpdate], seed: bytes) -> list[WeightedUpdate]:
    """The seeded permutation: updates sorted by sha256(seed || update hash), the update hash breaking (never
    met) ties. Portable: no PRNG, and independent of the order the updates come in."""
    return sorted(updates, key=lambda u: (digest(seed + u.key), u.key))


class Bucketing:
    """Bucketing (Karimireddy, He & Jaggi 2022): permute the updates by the seed (bucket_order), cut the
    permutation into buckets of `bucket_size` (the last may be smaller), replace each bucket by its
    sample-weighted mean (summed in canonical order; the bucket's weight is the sum of its members') and hand
    the bucket means to `inner`. A bucket of one is its update itself, so bucket_size 1 is `inner`. A bucket
    mixes authors, so no author is reported as an outlier (the inner rule's choice is about buckets)."""

    name = "bucketing"

    def __init__(self, inner: Aggregator, bucket_size: int, seed: bytes) -> None:
        self.inner = inner
        self.bucket_size = max(1, int(bucket_size))
        self.seed = bytes(seed)

    def buckets(self, updates: Sequence[WeightedUpdate]) -> list[list[WeightedUpdate]]:
        perm = bucket_order(_ordered(updates), self.seed)
        s = self.bucket_size
        return [_ordered(perm[i : i + s]) for i in range(0, len(perm), s)]

    def prepare(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[ChunkFn, frozenset[bytes]]:
        means: list[WeightedUpdate] = []
        for members in self.buckets(updates):
            if len(members) == 1:
                means.append(members[0])
                continue
            weights = [float(u.num_samples) for u in members]
            if math.fsum(weights) <= 0:
                weights = [1.0] * len(members)
            key = _bucket_key(members)
            means.append(WeightedUpdate(key, key, MixedDelta(tuple(u.delta for u in members), tuple(weights)),
                                        sum(u.num_samples for u in members)))
        fn, _ = self.inner.prepare(means, rules)
        return fn, frozenset()


class NearestNeighbourMixing:
    """Nearest-neighbour mixing (Allouah et al. 2023): replace each update by the unweighted mean of its
    n - f nearest updates by squared L2 distance, itself included (first), ties broken by update hash, then
    hand the mixed updates to `inner`. A mixed update keeps its centre's hash, author and weight, so the inner
    rule's outliers are the authors whose neighbourhoods it left out."""

    name = "nnm"

    def __init__(self, inner: Aggregator, byzantine: int) -> None:
        self.inner = inner
        self.byzantine = max(0, int(byzantine))

    def neighbourhoods(self, updates: Sequence[WeightedUpdate]) -> list[list[int]]:
        """Per update (canonical order), the canonical indices of its n - f nearest, in canonical order."""
        ups = _ordered(updates)
        n = len(ups)
        k = min(n, max(1, n - self.byzantine))
        dist = _sq_distances(ups) if n > 1 else [[0.0]]
        out = []
        for i in range(n):
            near = sorted(range(n), key=lambda j: (j != i, dist[i][j], ups[j].key))[:k]
            out.append(sorted(near))
        return out

    def prepare(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[ChunkFn, frozenset[bytes]]:
        ups = _ordered(updates)
        mixed = []
        for i, near in enumerate(self.neighbourhoods(ups)):
            members = [ups[j] for j in near]
            mixed.append(replace(ups[i], delta=MixedDelta(tuple(u.delta for u in members), (1.0,) * len(members))))
        return self.inner.prepare(mixed, rules)


class ReputationWeighted:
    """Each weight (the clipped sample count) multiplied by its author's reputation (an integer, negative taken
    as 0; integers, so the product is exact). All products zero: the weights are left as they were."""

    name = "reputation"

    def __init__(self, inner: Aggregator, reputation: Mapping[bytes, int]) -> None:
        self.inner = inner
        self.reputation = dict(reputation)

    def prepare(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[ChunkFn, frozenset[bytes]]:
        w = [u.num_samples * max(0, int(self.reputation.get(u.author, 0))) for u in updates]
        if any(w):
            updates = [replace(u, num_samples=x) for u, x in zip(updates, w, strict=True)]
        return self.inner.prepare(updates, rules)


AGGREGATORS: dict[str, type] = {a.name: a for a in (FedAvg, Median, TrimmedMean, MultiKrum, CenteredClip,
                                                     CenteredClipMomentum)}
MIXING = ("none", "bucketing", "nnm")


def sample_weights(declared: Sequence[int], multiple: int) -> list[int]:
    """Each declared count clipped to `multiple` x the lower median of all of them (0: no clip). The lower
    median lies within the honest counts while fewer than half the updates lie, however large their claims."""
    if multiple <= 0 or not declared:
        return list(declared)
    cap = multiple * sorted(declared)[(len(declared) - 1) // 2]
    return [min(d, cap) for d in declared]


def make_aggregator(name: str, momentum: ChunkFn | None = None) -> Aggregator:
    if name == CenteredClipMomentum.name:
        return CenteredClipMomentum(momentum)
    try:
        return AGGREGATORS[name]()  # type: ignore[no-any-return]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r} ({', '.join(AGGREGATORS)})") from None


def model_step(model: Tensors, previous: Tensors, server_lr: float) -> ChunkFn | None:
    """The last committed aggregate step, (model - previous) / server_lr, chunk by chunk (None: no step)."""
    if not previous or server_lr == 0:
        return None

    def chunk(name: str, start: int, stop: int) -> np.ndarray:
        a = np.asarray(model[name]).reshape(-1)[start:stop].astype(np.float64)
        b = np.asarray(previous[name]).reshape(-1)[start:stop].astype(np.float64)
        return (a - b) / server_lr

    return chunk


def build_aggregator(rules: Rules, *, seed: bytes = b"", reputation: Mapping[bytes, int] | None = None,
                     momentum: ChunkFn | None = None) -> Aggregator:
    """The genesis' rule with what goes in front of it: reputation weighting, then bucketing or NNM."""
    agg: Aggregator = make_aggregator(rules.aggregator, momentum)
    if rules.mixing == "bucketing":
        agg = Bucketing(agg, rules.bucket_size, seed)
    elif rules.mixing == "nnm":
        agg = NearestNeighbourMixing(agg, rules.krum_byzantine)
    if rules.reputation_weighted and reputation is not None:
        agg = ReputationWeighted(agg, reputation)
    return agg


def aggregate(base: Tensors, updates: Sequence[WeightedUpdate], rules: Rules, *, seed: bytes = b"",
              reputation: Mapping[bytes, int] | None = None, previous: Tensors | None = None) -> AggregationResult:
    """theta_{t+1} = theta_t + server_lr * combine(deltas); no updates leaves the model unchanged. Weights are
    the declared sample counts after sample_weights (integers, so the clip is exact), times the authors'
    reputation under `reputation_weighted`. `mixing` puts bucketing (seeded by `seed`) or nearest-neighbour
    mixing in front of the rule; `previous` (the model before `base`) gives centered_clip_momentum its centre.
    The new model is written a coordinate chunk at a time: besides the models, memory holds one chunk of every
    update."""
    if not updates:
        return AggregationResult({k: v.copy() for k, v in base.items()}, frozenset())
    weights = sample_weights([u.num_samples for u in updates], rules.weight_median_multiple)
    updates = [replace(u, num_samples=w) for u, w in zip(updates, weights, strict=True)]
    momentum = model_step(base, previous or {}, float(rules.server_lr))
    agg = build_aggregator(rules, seed=seed, reputation=reputation, momentum=momentum)
    fn, outliers = agg.prepare(updates, rules)
    lr = float(rules.server_lr)
    new: Tensors = {}
    for k, b in base.items():
        src = np.asarray(b).reshape(-1)
        out = np.empty(np.shape(b), dtype=np.float32)
        flat = out.reshape(-1)
        for a, e in chunks(src.size):
            flat[a:e] = (src[a:e].astype(np.float64) + lr * fn(k, a, e)).astype(np.float32)
        new[k] = out
    return AggregationResult(new, outliers)
