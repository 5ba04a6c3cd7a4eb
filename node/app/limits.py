"""Limits fixed by the genesis: the exact size of an update blob and each participant's sample cap."""

from __future__ import annotations

import functools

from flnode.protocol.genesis import Genesis, TaskSpec

from .compression import blob_size
from .data import load_dataset, partition
from .models import param_spec as param_spec  # re-export: validation.py, participant.py, node/export.py


def update_blob_size(genesis: Genesis) -> int:
    """The exact byte size of every well-formed update blob of the genesis task (protocol/tensors.py format)."""
    return blob_size(genesis)  # from headers alone


@functools.lru_cache(maxsize=8)
def _shard_sizes(spec: TaskSpec, n_parts: int) -> tuple[int, ...]:
    train, _ = load_dataset(spec)
    return tuple(len(p) for p in partition(train, n_parts, spec))


def shard_sizes(spec: TaskSpec, n_parts: int) -> tuple[int, ...]:
    """Sizes of the task's training shards when split `n_parts` ways."""
    return _shard_sizes(spec, n_parts)


def samples_cap(genesis: Genesis, author: bytes, declared: int | None = None) -> int:
    """The most samples `author` may declare in one update: rules.max_samples_per_update, or if that is 0 the
    author's shard size of the task's training set. `author` must be a participant. A member admitted by
    transaction declared its count when it joined: that is its cap (and so its weight's bound)."""
    cap = genesis.rules.max_samples_per_update
    if not genesis.is_validator(author) and declared is not None:
        return min(declared, cap)  # off genesis admission the genesis must set the cap (Genesis.check)
    if cap > 0:
        return cap
    return _shard_sizes(genesis.task, len(genesis.validators))[genesis.index_of(author)]
