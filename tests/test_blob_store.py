"""The blob store (store.blobs) and its files: a blob put is found after a reopen (re-hashed, then indexed by the
next commit), torn or foreign files are dropped at open, pruning removes files and index rows, and a height's
block rows and blob index rows commit all-or-nothing."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from flnode.node.chain.blob_files import BlobFiles
from flnode.node.chain.store import ChainStore
from flnode.protocol.hashing import digest
from flnode.protocol.tensors import encode_tensors
from test_chain import make_chain


@pytest.fixture(scope="module")
def chain4() -> Any:
    return make_chain(4)


def _indexed(s: ChainStore) -> set[bytes]:
    return {bytes(r[0]) for r in s.conn.execute("SELECT hash FROM blob_index")}


def _commit(s: ChainStore, entry: Any, blobs: dict[bytes, bytes]) -> None:
    block, cert, state, receipt = entry
    for u in block.updates:
        s.blobs.put(u.blob_hash, blobs[u.blob_hash], block.height)
    s.commit_height(block, cert, state, receipt, encode_tensors(state.model))


def test_a_blob_put_is_found_after_a_reopen_and_indexed_by_the_next_commit(tmp_path: Path, chain4: Any) -> None:
    _, entries, blobs = chain4
    data = os.urandom(10_000)
    h = digest(data)
    s = ChainStore.open(tmp_path / "c.sqlite")
    s.blobs.put(h, data, height=1)
    assert h not in _indexed(s)  # put writes no SQLite row
    s.close()
    s = ChainStore.open(tmp_path / "c.sqlite")  # un-indexed: re-hashed at open, kept pending
    assert s.blobs.get(h) == data and s.blobs.has(h)
    _commit(s, entries[0], blobs)
    assert h in _indexed(s)
    s.close()
    reader = ChainStore.open(tmp_path / "c.sqlite", readonly=True)
    r = reader.blobs.reader(h)
    assert r is not None and r.read_at(0, r.size) == data
    r.close()
    reader.close()


def test_open_drops_temporary_and_corrupt_unindexed_files(tmp_path: Path) -> None:
    s = ChainStore.open(tmp_path / "c.sqlite")
    good, bad = os.urandom(3000), os.urandom(3000)
    s.blobs.put(digest(good), good)
    s.blobs.put(digest(bad), bad)
    s.close()
    files = BlobFiles(tmp_path / "c.blobs")
    files.path(digest(bad)).write_bytes(bad[:1000])  # torn by a power cut before any commit fsync'd it
    tmp = files.path(digest(good)).parent / f"{BlobFiles.TMP}{digest(good).hex()}.1.1"
    tmp.write_bytes(b"half")
    s = ChainStore.open(tmp_path / "c.sqlite")
    assert s.blobs.has(digest(good)) and not s.blobs.has(digest(bad)) and not tmp.exists()
    s.close()


def test_prune_removes_files_and_index_rows(tmp_path: Path, chain4: Any) -> None:
    _, entries, blobs = chain4
    s = ChainStore.open(tmp_path / "c.sqlite")
    for entry in entries:
        _commit(s, entry, blobs)
    old = [u.blob_hash for u in entries[0][0].updates]
    paths = [s.blobs.files.path(bh) for bh in old]
    assert all(p.exists() for p in paths)
    removed: list[bytes] = []
    n = s.prune_blobs(4, 2, removed)  # cut-off height 2: height 1's blobs go, the model of height 2 stays
    assert n == len(removed) > 0 and set(old) <= set(removed)
    assert not any(p.exists() for p in paths) and not set(old) & _indexed(s)
    assert s.blobs.floor() == 2 and s.blobs.has(entries[1][2].model_hash)
    assert s.blobs.get(entries[0][2].model_hash) is None
    s.close()
    assert ChainStore.open(tmp_path / "c.sqlite", readonly=True).blobs.floor() == 2


def test_a_commit_whose_index_rows_fail_leaves_no_block_rows(tmp_path: Path, chain4: Any) -> None:
    _, entries, blobs = chain4
    s = ChainStore.open(tmp_path / "c.sqlite")
    s.conn.execute("CREATE TEMP TRIGGER no_index BEFORE INSERT ON blob_index BEGIN SELECT RAISE(ABORT, 'no'); END")
    with pytest.raises(sqlite3.IntegrityError):
        _commit(s, entries[0], blobs)
    assert s.latest_height() == 0 and _indexed(s) == set()
    for table in ("blocks", "certificates", "states", "receipts"):
        assert s.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table
    s.conn.execute("DROP TRIGGER no_index")
    _commit(s, entries[0], blobs)  # the blobs are still pending: indexed by the retry
    assert s.latest_height() == 1
    assert {u.blob_hash for u in entries[0][0].updates} | {entries[0][2].model_hash} <= _indexed(s)
    s.close()


def test_a_commit_whose_block_rows_fail_leaves_no_index_rows(tmp_path: Path, chain4: Any) -> None:
    _, entries, blobs = chain4
    s = ChainStore.open(tmp_path / "c.sqlite")
    s.conn.execute("INSERT INTO receipts (height, data) VALUES (1, x'00')")  # the height's last row collides
    with pytest.raises(sqlite3.IntegrityError):
        _commit(s, entries[0], blobs)
    assert s.latest_height() == 0 and _indexed(s) == set()
    s.close()
