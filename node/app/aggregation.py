"""Aggregation rules as small strategy classes, deterministic to the bit on every machine.

Updates arrive sorted by announcement hash. Accumulation is elementwise in float64, in that fixed order (IEEE
elementwise add/multiply is correctly rounded, so the result cannot depend on SIMD width or thread count); no
np.sum/np.dot/BLAS reduction touches a value that enters the model. Selection scores (Multi-Krum) use exactly
rounded sums (math.fsum) and a stable sort with the update hash as the tie-break.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeAlias

import numpy as np
from flnode.protocol.genesis import Rules
from flnode.protocol.tensors import StreamedTensors

from .validation import SumSquares, chunks

Tensors = dict[str, np.ndarray]
Delta: TypeAlias = "dict[str, np.ndarray] | StreamedTensors"
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


def _flat64(d: Delta, name: str, start: int, stop: int) -> np.ndarray:
    if isinstance(d, StreamedTensors):
        return d.flat(name, start, stop).astype(np.float64)
    return np.asarray(d[name]).reshape(-1)[start:stop].astype(np.float64)


def _count(d: Delta, name: str) -> int:
    if isinstance(d, StreamedTensors):
        return d.spans[name].count
    return int(np.asarray(d[name]).size)


def _shape(d: Delta, name: str) -> tuple[int, ...]:
    return d.shape(name) if isinstance(d, StreamedTensors) else tuple(np.asarray(d[name]).shape)


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
    """Centered clipping (Karimireddy et al. 2021), stateless: start from the coordinate-wise median v, then
    CC_ITERATIONS times v <- v + (1/n) sum_i (x_i - v) * min(1, tau / ||x_i - v||), with tau the lower median of
    the distances ||x_i - v_0|| (no rule to tune; the genesis has no history to keep a momentum in). Unweighted,
    as in the paper (a sample count is a claim). Distances go through the fixed-order row sums of
    fixed_order_sum_squares per tensor and math.fsum over tensors; the sums over updates are elementwise in the
    canonical order, so the result is the same to the bit everywhere. It holds the centre (one float64 model)
    while it iterates; it leaves nobody out."""

    name = "centered_clip"
    iterations = 3

    def prepare(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[ChunkFn, frozenset[bytes]]:
        ups = _ordered(updates)
        n = len(ups)
        med, _ = Median().prepare(ups, rules)
        first = ups[0].delta
        sizes = {name: _count(first, name) for name in first}
        centre = {name: np.concatenate([med(name, a, b) for a, b in chunks(c)]) if c else np.zeros(0)
                  for name, c in sizes.items()}

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
        tau = sorted(d0)[(n - 1) // 2]
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


AGGREGATORS: dict[str, type] = {a.name: a for a in (FedAvg, Median, TrimmedMean, MultiKrum, CenteredClip)}


def sample_weights(declared: Sequence[int], multiple: int) -> list[int]:
    """Each declared count clipped to `multiple` x the lower median of all of them (0: no clip). The lower
    median lies within the honest counts while fewer than half the updates lie, however large their claims."""
    if multiple <= 0 or not declared:
        return list(declared)
    cap = multiple * sorted(declared)[(len(declared) - 1) // 2]
    return [min(d, cap) for d in declared]


def make_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]()  # type: ignore[no-any-return]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r} ({', '.join(AGGREGATORS)})") from None


def aggregate(base: Tensors, updates: Sequence[WeightedUpdate], rules: Rules) -> AggregationResult:
    """theta_{t+1} = theta_t + server_lr * combine(deltas); no updates leaves the model unchanged. Weights are
    the declared sample counts after sample_weights (integers, so the clip is exact). The new model is written a
    coordinate chunk at a time: besides the two models, memory holds one chunk of every update."""
    if not updates:
        return AggregationResult({k: v.copy() for k, v in base.items()}, frozenset())
    weights = sample_weights([u.num_samples for u in updates], rules.weight_median_multiple)
    updates = [replace(u, num_samples=w) for u, w in zip(updates, weights, strict=True)]
    fn, outliers = make_aggregator(rules.aggregator).prepare(updates, rules)
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
