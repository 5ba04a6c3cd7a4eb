"""Data sets and how they are split across participants. Everything seeded; nothing downloaded."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flnode.protocol.genesis import TaskSpec

DIGITS_PATH = Path(__file__).resolve().parent / "data" / "digits.npz"


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32 (n, d)
    y: np.ndarray  # int64 (n,)
    n_classes: int

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_npz(path: str | Path, n_classes: int | None = None) -> Dataset:
    """A user's own data: an .npz with `x` (n, d) numbers and `y` (n,) integer labels."""
    try:
        with np.load(path) as f:
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: need an .npz with arrays x and y ({exc})") from None
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{path}: x must be (n, d) and y (n,), got {x.shape} and {y.shape}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"{path}: labels must be non-negative integers")
    return Dataset(x.astype(np.float32), y, n_classes or int(y.max()) + 1)


def _digits() -> Dataset:
    with np.load(DIGITS_PATH) as f:
        x = f["x"].astype(np.float32) / 16.0  # 8x8 images, pixel values 0..16
        y = f["y"].astype(np.int64)
    return Dataset(x, y, 10)


def _synthetic(spec: TaskSpec) -> Dataset:
    """A seeded Gaussian mixture: one mean per class, unit noise. Sizes come from the task spec."""
    rng = np.random.default_rng(spec.seed + 7919)
    means = rng.normal(0.0, 1.0, size=(spec.synthetic_classes, spec.synthetic_features)).astype(np.float32)
    y = rng.integers(0, spec.synthetic_classes, size=spec.synthetic_samples).astype(np.int64)
    x = means[y] + rng.normal(0.0, 1.0, size=(spec.synthetic_samples, spec.synthetic_features)).astype(np.float32)
    return Dataset(x.astype(np.float32), y, spec.synthetic_classes)


@functools.lru_cache(maxsize=4)
def load_full(spec: TaskSpec) -> Dataset:
    """The whole data set of a task (cached: callers must not modify the arrays)."""
    if spec.dataset == "digits":
        return _digits()
    if spec.dataset == "synthetic":
        return _synthetic(spec)
    return load_npz(spec.dataset)


@functools.lru_cache(maxsize=4)
def load_dataset(spec: TaskSpec) -> tuple[Dataset, Dataset]:
    """(train, test): a seeded split with spec.test_fraction held out."""
    full = load_full(spec)
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(full))
    n_test = max(1, int(round(len(full) * spec.test_fraction)))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    return (
        Dataset(full.x[train_idx], full.y[train_idx], full.n_classes),
        Dataset(full.x[test_idx], full.y[test_idx], full.n_classes),
    )


def partition(train: Dataset, n_parts: int, spec: TaskSpec) -> list[Dataset]:
    """Split across participants: "iid" (shuffled equal shares) or "dirichlet" (per-class shares ~ Dir(alpha))."""
    if n_parts < 1 or n_parts > len(train):
        raise ValueError(f"cannot split {len(train)} samples into {n_parts} parts")
    rng = np.random.default_rng(spec.seed + 1)
    if spec.partition == "iid":
        parts = np.array_split(rng.permutation(len(train)), n_parts)
    elif spec.partition == "dirichlet":
        buckets: list[list[int]] = [[] for _ in range(n_parts)]
        for c in range(train.n_classes):
            idx = rng.permutation(np.flatnonzero(train.y == c))
            shares = rng.dirichlet([spec.dirichlet_alpha] * n_parts)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                buckets[i].extend(chunk.tolist())
        # Every participant needs data: move one sample from the largest share into any empty one.
        for i in range(n_parts):
            if not buckets[i]:
                j = max(range(n_parts), key=lambda k: len(buckets[k]))
                buckets[i].append(buckets[j].pop())
        parts = [np.sort(np.array(b, dtype=np.int64)) for b in buckets]
    else:
        raise ValueError(f"unknown partition {spec.partition!r} (iid | dirichlet)")
    return [Dataset(train.x[p], train.y[p], train.n_classes) for p in parts]


def participant_data(spec: TaskSpec, n_parts: int, index: int, own_npz: str | None = None) -> Dataset:
    """The private data of participant `index`: its own file if it has one, else its shard of the task data."""
    if own_npz:
        _, test = load_dataset(spec)
        return load_npz(own_npz, test.n_classes)
    train, _ = load_dataset(spec)
    return partition(train, n_parts, spec)[index]
