"""Aggregation rules as small strategy classes, deterministic to the bit on every machine.

Updates arrive sorted by announcement hash. Accumulation is elementwise in float64, in that fixed order (IEEE
elementwise add/multiply is correctly rounded, so the result cannot depend on SIMD width or thread count); no
np.sum/np.dot/BLAS reduction touches a value that enters the model. Selection scores (Multi-Krum) use exactly
rounded sums (math.fsum) and a stable sort with the update hash as the tie-break.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from flnode.protocol.genesis import Rules

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class WeightedUpdate:
    key: bytes  # announcement hash: the canonical order and the tie-break
    author: bytes
    delta: Tensors
    num_samples: int


@dataclass(frozen=True)
class AggregationResult:
    new_model: Tensors
    outliers: frozenset[bytes]  # authors whose updates the rule left out


class Aggregator(Protocol):
    name: str

    def combine(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[dict[str, np.ndarray], frozenset[bytes]]:
        """The aggregated delta (float64) and the authors left out."""
        ...


def _ordered(updates: Sequence[WeightedUpdate]) -> list[WeightedUpdate]:
    return sorted(updates, key=lambda u: u.key)


def _weighted_mean(updates: Sequence[WeightedUpdate], weights: Sequence[float]) -> dict[str, np.ndarray]:
    total = math.fsum(weights)
    out: dict[str, np.ndarray] = {}
    for name in updates[0].delta:
        acc = np.zeros(updates[0].delta[name].shape, dtype=np.float64)
        for u, w in zip(updates, weights, strict=True):
            acc += (w / total) * u.delta[name].astype(np.float64)
        out[name] = acc
    return out


class FedAvg:
    """Weights = sample counts (McMahan et al.)."""

    name = "fedavg"

    def combine(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[dict[str, np.ndarray], frozenset[bytes]]:
        ups = _ordered(updates)
        return _weighted_mean(ups, [float(u.num_samples) for u in ups]), frozenset()


def _stack(updates: Sequence[WeightedUpdate], name: str) -> np.ndarray:
    return np.stack([u.delta[name].astype(np.float64) for u in updates])


class Median:
    """Coordinate-wise median (Yin et al. 2018); for an even count the mean of the two middle values."""

    name = "median"

    def combine(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[dict[str, np.ndarray], frozenset[bytes]]:
        ups = _ordered(updates)
        n = len(ups)
        out = {}
        for name in ups[0].delta:
            s = np.sort(_stack(ups, name), axis=0, kind="stable")
            out[name] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * 0.5
        return out, frozenset()


class TrimmedMean:
    """Coordinate-wise mean after dropping the k largest and k smallest values, k = floor(trim_fraction * n)."""

    name = "trimmed_mean"

    def combine(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[dict[str, np.ndarray], frozenset[bytes]]:
        ups = _ordered(updates)
        n = len(ups)
        k = min(int(math.floor(rules.trim_fraction * n)), (n - 1) // 2)
        out = {}
        for name in ups[0].delta:
            s = np.sort(_stack(ups, name), axis=0, kind="stable")
            acc = np.zeros(s.shape[1:], dtype=np.float64)
            for row in s[k : n - k]:  # fixed order, elementwise
                acc += row
            out[name] = acc / (n - 2 * k)
        return out, frozenset()


def _sq_distance(a: Tensors, b: Tensors) -> float:
    """Squared distance: per-element differences (correctly rounded) summed in a fixed order."""
    from .validation import fixed_order_sum_squares

    return math.fsum(fixed_order_sum_squares(a[n].astype(np.float64) - b[n].astype(np.float64)) for n in a)


class MultiKrum:
    """Multi-Krum (Blanchard et al. 2017): score each update by the sum of squared distances to its n - f - 2
    nearest neighbours, keep the m best (m = krum_select or n - f), FedAvg them. The rest are outliers."""

    name = "multi_krum"

    def combine(self, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[dict[str, np.ndarray], frozenset[bytes]]:
        ups = _ordered(updates)
        n = len(ups)
        f = rules.krum_byzantine
        m = rules.krum_select or max(1, n - f)
        if n <= 2 * f + 2 or m >= n:
            return FedAvg().combine(ups, rules)[0], frozenset()
        dist = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                dist[i][j] = dist[j][i] = _sq_distance(ups[i].delta, ups[j].delta)
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


AGGREGATORS: dict[str, type] = {a.name: a for a in (FedAvg, Median, TrimmedMean, MultiKrum)}


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
    the declared sample counts after sample_weights (integers, so the clip is exact)."""
    if not updates:
        return AggregationResult({k: v.copy() for k, v in base.items()}, frozenset())
    weights = sample_weights([u.num_samples for u in updates], rules.weight_median_multiple)
    updates = [replace(u, num_samples=w) for u, w in zip(updates, weights, strict=True)]
    delta, outliers = make_aggregator(rules.aggregator).combine(updates, rules)
    lr = float(rules.server_lr)
    new = {k: (base[k].astype(np.float64) + lr * delta[k]).astype(np.float32) for k in base}
    return AggregationResult(new, outliers)
