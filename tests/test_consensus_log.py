"""The consensus log (store.log): records in order per height, durable across a reopen, a torn last record
dropped at restore, pruning by height."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from flnode.node.chain.store import ChainStore, StoreError


def good_until(marker: bytes) -> Callable[[Sequence[bytes]], int]:
    """A check_records stand-in: the records before the first one starting with `marker` are good."""
    def check(records: Sequence[bytes]) -> int:
        return next((i for i, r in enumerate(records) if r.startswith(marker)), len(records))
    return check


def test_records_keep_their_order_per_height_and_survive_a_reopen(tmp_path: Path) -> None:
    s = ChainStore.open(tmp_path / "c.sqlite")
    for rec in (b"a", b"b", b"c"):
        s.log.append(5, rec)
    s.log.append(6, b"x")
    s.close()
    s = ChainStore.open(tmp_path / "c.sqlite")  # every append was its own commit: nothing lost by closing
    assert s.log.records(5) == [b"a", b"b", b"c"] and s.log.records(6) == [b"x"] and s.log.records(7) == []
    s.close()
    reader = ChainStore.open(tmp_path / "c.sqlite", readonly=True)
    assert reader.log.records(5) == [b"a", b"b", b"c"]
    reader.close()


def test_a_torn_last_record_is_dropped_before_the_next_append(tmp_path: Path) -> None:
    s = ChainStore.open(tmp_path / "c.sqlite")
    for rec in (b"ok1", b"ok2", b"TORN"):
        s.log.append(3, rec)
    assert s.restorable_records(3, good_until(b"TORN")) == [b"ok1", b"ok2"]
    s.log.append(3, b"ok3")  # lands right after ok2, not behind the torn one
    s.close()
    s = ChainStore.open(tmp_path / "c.sqlite")
    assert s.log.records(3) == [b"ok1", b"ok2", b"ok3"]
    s.close()


def test_a_bad_record_before_the_last_refuses_and_deletes_nothing(tmp_path: Path) -> None:
    s = ChainStore.open(tmp_path / "c.sqlite")
    for rec in (b"ok", b"BAD", b"ok"):
        s.log.append(1, rec)
    with pytest.raises(StoreError, match="only the last one may be torn"):
        s.log.restorable(1, good_until(b"BAD"))
    assert s.log.records(1) == [b"ok", b"BAD", b"ok"]
    s.close()


def test_prune_forgets_heights_below(tmp_path: Path) -> None:
    s = ChainStore.open(tmp_path / "c.sqlite")
    for h in (1, 2, 3):
        s.log.append(h, b"r%d" % h)
    s.prune_records(3)
    assert s.log.records(1) == [] and s.log.records(2) == [] and s.log.records(3) == [b"r3"]
    s.close()
