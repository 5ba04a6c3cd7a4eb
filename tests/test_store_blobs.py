"""Blob files beside the chain store: atomic under crashes, hash-checked reads, stat-only existence, old stores
migrated, pruning bounded and still verifiable, a full disk a typed error."""

from __future__ import annotations

import builtins
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flnode.cli.main import app
from flnode.node.app import encode_state
from flnode.node.chain.blob_files import BlobWriteError, DiskFullError
from flnode.node.chain.store import ChainStore, StoreError
from flnode.node.chain.verify import verify_chain
from flnode.node.config import ConfigError, NodeConfig, load_config, write_config
from flnode.protocol.hashing import digest
from flnode.protocol.tensors import encode_tensors
from test_chain import make_chain, store_chain
from typer.testing import CliRunner

Chain = tuple[Any, list[Any], dict[bytes, bytes]]


@pytest.fixture(scope="module")
def chain8() -> Chain:
    return make_chain(8)


def _index(s: ChainStore, h: bytes) -> tuple[int, int, str] | None:
    """(size, height, kind) of an indexed blob, read from the on-disk index."""
    row = s.conn.execute("SELECT size, height, kind FROM blob_index WHERE hash = ?", (h,)).fetchone()
    return None if row is None else (int(row[0]), int(row[1]), str(row[2]))


def _commit(s: ChainStore, entry: Any) -> None:
    block, cert, state, receipt = entry
    s.commit_height(block, cert, state, receipt, encode_tensors(state.model))


def test_put_get_has_and_the_file_layout(tmp_path: Path) -> None:
    s = ChainStore.open(tmp_path / "chain.sqlite")
    data = b"update" * 1000
    h = digest(data)
    assert not s.blobs.has(h) and s.blobs.get(h) is None and not s.blobs.files.path(h).exists()
    s.blobs.put(h, data, height=3)
    assert s.blobs.files.root == tmp_path / "blobs"
    assert s.blobs.files.path(h) == tmp_path / "blobs" / h.hex()[:2] / h.hex()
    assert s.blobs.has(h) and s.blobs.get(h) == data
    r = s.blobs.reader(h)
    assert r is not None and r.read_at(0, r.size) == data
    r.close()
    with pytest.raises(StoreError, match="hash"):
        s.blobs.put(digest(b"x"), b"y")
    s.close()


def test_a_torn_temporary_file_is_never_visible(tmp_path: Path) -> None:
    s = ChainStore.open(tmp_path / "c.sqlite")
    data = os.urandom(50_000)
    h = digest(data)
    p = s.blobs.files.path(h)
    p.parent.mkdir(parents=True)
    tmp = p.parent / f".tmp-{p.name}.1.1"
    tmp.write_bytes(data[:1000])  # the writer died before its rename
    assert not s.blobs.has(h) and s.blobs.get(h) is None
    s.close()
    s = ChainStore.open(tmp_path / "c.sqlite")  # start-up clears leftovers
    assert not tmp.exists() and not s.blobs.has(h)
    s.close()


def test_unindexed_torn_file_is_dropped_at_open(tmp_path: Path) -> None:
    """Blobs are not fsync'd until their height commits: after a power cut a renamed one may be torn. Open
    re-hashes what the index does not know; a good one is kept and indexed by the next commit."""
    g, blocks, blobs = make_chain(1)
    s = ChainStore.open(tmp_path / "c.sqlite")
    good, torn = os.urandom(3000), os.urandom(3000)
    s.blobs.put(digest(good), good)
    s.blobs.put(digest(torn), torn)
    s.blobs.files.path(digest(torn)).write_bytes(torn[:100])
    s.close()
    s = ChainStore.open(tmp_path / "c.sqlite")
    assert not s.blobs.has(digest(torn)) and s.blobs.get(digest(good)) == good
    for h, b in blobs.items():
        s.blobs.put(h, b, height=1)
    _commit(s, blocks[0])
    assert _index(s, digest(good)) == (3000, 1, "update")
    s.close()


WRITER = """
import os, sys
from pathlib import Path
from flnode.node.chain.store import ChainStore
from flnode.protocol.hashing import digest
s = ChainStore.open(Path(sys.argv[1]))
print("ready", flush=True)
i = 0
while True:
    data = os.urandom(1 + (i * 7919) % 400_000)
    s.blobs.put(digest(data), data, height=i)
    i += 1
"""


def test_kill9_while_writing_blobs_leaves_only_whole_files(tmp_path: Path) -> None:
    script = tmp_path / "w.py"
    script.write_text(WRITER)
    db = tmp_path / "c.sqlite"
    for attempt in range(5):
        p = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().startswith("ready")
        time.sleep(0.05 + 0.03 * attempt)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        reader = ChainStore.open(db, readonly=True)
        seen = 0
        for h, path in reader.blobs.files.scan():
            if h is not None:  # every file under a hash name hashes to it
                assert digest(path.read_bytes()) == h
                assert reader.blobs.get(h) is not None
                seen += 1
        reader.close()
        assert seen > 0
    s = ChainStore.open(db)  # and the writer reopens, clearing temporary files
    assert all(h is not None for h, _ in s.blobs.files.scan())
    s.close()


def test_has_blob_never_reads_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = ChainStore.open(tmp_path / "c.sqlite")
    data = b"z" * 10_000
    s.blobs.put(digest(data), data)

    def no(*a: Any, **k: Any) -> Any:
        raise AssertionError("has_blob opened a file")

    monkeypatch.setattr(builtins, "open", no)
    monkeypatch.setattr(os, "open", no)
    assert s.blobs.has(digest(data)) and not s.blobs.has(digest(b"absent"))
    monkeypatch.undo()
    s.close()


def test_a_corrupt_blob_file_is_never_served(tmp_path: Path) -> None:
    s = ChainStore.open(tmp_path / "c.sqlite")
    data = os.urandom(4096)
    h = digest(data)
    s.blobs.put(h, data)
    s.blobs.files.path(h).write_bytes(os.urandom(4096))  # same size, other content (bit rot)
    reader = ChainStore.open(tmp_path / "c.sqlite", readonly=True)
    assert reader.blobs.get(h) is None and reader.blobs.has(h)  # a reader reports it missing, deletes nothing
    assert s.blobs.get(h) is None and not s.blobs.has(h)  # the writer deletes it
    s.blobs.put(h, data)  # and can fetch it again
    assert reader.blobs.get(h) == data
    reader.close()
    s.close()


def test_disk_full_is_a_typed_store_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = ChainStore.open(tmp_path / "c.sqlite")
    data = os.urandom(1000)
    for err, cls in ((errno.ENOSPC, DiskFullError), (errno.EIO, BlobWriteError)):
        def failing(fd: int, b: Any, err: int = err) -> int:
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(os, "write", failing)
        with pytest.raises(cls) as info:
            s.blobs.put(digest(data), data)
        monkeypatch.undo()
        assert isinstance(info.value, StoreError)
        assert not s.blobs.has(digest(data))
        assert [p for _, p in s.blobs.files.scan()] == []  # no temporary file left behind
    s.close()


def _legacy_store(path: Path, chain: Chain) -> None:
    """A store as the previous version wrote it: blobs inside SQLite."""
    g, blocks, blobs = chain
    c = sqlite3.connect(path)
    c.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
        CREATE TABLE blocks (height INTEGER PRIMARY KEY, hash BLOB NOT NULL, data BLOB NOT NULL);
        CREATE TABLE certificates (height INTEGER PRIMARY KEY, data BLOB NOT NULL);
        CREATE TABLE states (height INTEGER PRIMARY KEY, model_hash BLOB NOT NULL, data BLOB NOT NULL);
        CREATE TABLE receipts (height INTEGER PRIMARY KEY, data BLOB NOT NULL);
        CREATE TABLE blobs (hash BLOB PRIMARY KEY, data BLOB NOT NULL);
        CREATE TABLE consensus_records (height INTEGER NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
            PRIMARY KEY (height, seq));
        CREATE TABLE metrics (height INTEGER PRIMARY KEY, data TEXT NOT NULL);
    """)
    c.execute("INSERT INTO meta VALUES ('genesis_hash', ?)", (g.hash(),))
    for h, b in blobs.items():
        c.execute("INSERT INTO blobs VALUES (?, ?)", (h, b))
    c.execute("INSERT INTO blobs VALUES (?, ?)", (b"\x01" * 32, b"orphan, not matching its hash"))
    for block, cert, state, receipt in blocks:
        h = block.height
        c.execute("INSERT INTO blocks VALUES (?, ?, ?)", (h, block.hash(), block.encode()))
        c.execute("INSERT INTO certificates VALUES (?, ?)", (h, cert.encode()))
        c.execute("INSERT INTO states VALUES (?, ?, ?)", (h, state.model_hash, encode_state(state)))
        c.execute("INSERT INTO receipts VALUES (?, ?)", (h, receipt.encode()))
        model = encode_tensors(state.model)
        c.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?)", (digest(model), model))
    c.commit()
    c.close()


def test_an_old_store_with_blobs_in_sqlite_reads_and_migrates(tmp_path: Path, chain8: Chain) -> None:
    g, blocks, blobs = chain8
    db = tmp_path / "chain.sqlite"
    _legacy_store(db, chain8)
    reader = ChainStore.open(db, readonly=True, genesis_hash=g.hash())  # not migrated: read from the table
    u = blocks[2][0].updates[0].blob_hash
    assert reader.blobs.has(u) and reader.blobs.get(u) == blobs[u]
    assert reader.get_state(5).hash() == blocks[4][2].hash()
    assert verify_chain(reader, g).ok
    reader.close()

    s = ChainStore.open(db, genesis_hash=g.hash())  # the writer moves them to files
    assert not s.blobs.legacy and s.blobs.get(u) == blobs[u] and s.blobs.exists(u)
    assert _index(s, u) == (len(blobs[u]), 3, "update")
    assert _index(s, blocks[5][2].model_hash) == (len(encode_tensors(blocks[5][2].model)), 6, "model")
    assert _index(s, b"\x01" * 32) is None  # a corrupt legacy row is dropped, not served
    s.close()
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "blobs" not in tables
    reader = ChainStore.open(db, readonly=True)
    assert verify_chain(reader, g).ok
    reader.close()


def test_prune_keeps_what_verify_needs(tmp_path: Path, chain8: Chain) -> None:
    g, blocks, blobs = chain8
    home = tmp_path / "home"
    home.mkdir()
    g.save(home / "genesis.json")
    write_config(home, NodeConfig())
    db = home / "data" / "chain.sqlite"
    store_chain(db, g, blocks, blobs)
    s = ChainStore.open(db)
    orphan = os.urandom(500)
    s.blobs.put(digest(orphan), orphan, height=4)  # announced for 4, never in a block
    late = os.urandom(500)
    s.blobs.put(digest(late), late, height=9)  # announced for the next height: kept
    removed: list[bytes] = []
    n = s.prune_blobs(8, 3, removed)  # cut-off 5: heights 1-4 go, the model of 5 and everything later stays
    assert n == len(removed) > 0 and digest(orphan) in removed
    assert s.blobs.floor() == 5 and s.blobs.has(digest(late))
    for block, _, state, _ in blocks:
        h = block.height
        assert s.blobs.has(state.model_hash) == (h >= 5), h
        assert all(s.blobs.has(u.blob_hash) == (h > 4) for u in block.updates), h
    with pytest.raises(StoreError, match="missing"):
        s.get_state(4)
    assert s.get_state(5).hash() == blocks[4][2].hash()
    assert s.light_state(2).balances == blocks[1][2].balances  # balances survive pruning
    assert s.prune_blobs(8, 3) == 0 and s.prune_blobs(8, 0) == 0
    s.close()

    reader = ChainStore.open(db, readonly=True)
    report = verify_chain(reader, g)
    reader.close()
    assert report.ok, report.reason
    assert (report.start_height, report.signature_only, report.reexecuted) == (5, [1, 5], [6, 8])
    assert report.model_hash == blocks[-1][2].model_hash.hex()

    runner = CliRunner()
    res = runner.invoke(app, ["chain", "verify", "--home", str(home)])
    assert res.exit_code == 0, res.output
    assert "heights 1-5 by certificate" in res.output and "heights 6-8 re-executed" in res.output
    out = json.loads(runner.invoke(app, ["chain", "verify", "--home", str(home), "--json"]).output)
    assert out["ok"] and out["signature_only"] == [1, 5] and out["reexecuted"] == [6, 8]
    assert runner.invoke(app, ["chain", "show", "--home", str(home), "--height", "2", "--json"]).exit_code == 0


@pytest.mark.parametrize("what, height", [("certificate", 2), ("state row", 3), ("update blob", 7), ("missing", 6)])
def test_verify_after_pruning_still_names_tampering(tmp_path: Path, chain8: Chain, what: str, height: int) -> None:
    from dataclasses import replace

    g, blocks, blobs = chain8
    db = tmp_path / "c.sqlite"
    store_chain(db, g, blocks, blobs)
    s = ChainStore.open(db)
    s.prune_blobs(8, 3)
    block, cert, state, _ = blocks[height - 1]
    if what == "certificate":  # in the pruned range: still checked
        bad = replace(cert, signatures=((cert.signatures[0][0], b"\x00" * 64), *cert.signatures[1:]))
        s.conn.execute("UPDATE certificates SET data = ? WHERE height = ?", (bad.encode(), height))
    elif what == "state row":  # in the pruned range: checked against the certified app hash
        other = replace(state, balances={**state.balances, next(iter(state.balances)): 10**6})
        s.conn.execute("UPDATE states SET data = ? WHERE height = ?", (encode_state(other), height))
    elif what == "update blob":
        s.blobs.files.path(block.updates[0].blob_hash).write_bytes(b"junk")
    else:  # a blob above the floor may not be missing
        s.blobs.files.remove(block.updates[0].blob_hash)
    s.close()
    report = verify_chain(ChainStore.open(db, readonly=True), g)
    assert not report.ok and report.first_bad_height == height, report


def test_disk_use_stays_bounded_with_retention(tmp_path: Path) -> None:
    g, blocks, blobs = make_chain(40)
    s = ChainStore.open(tmp_path / "c.sqlite", genesis_hash=g.hash())
    retention = 4
    per_height = max(sum(len(blobs[u.blob_hash]) for u in b.updates) + len(encode_tensors(st.model))
                     for b, _, st, _ in blocks)
    sizes = []
    for entry in blocks:
        block = entry[0]
        for u in block.updates:
            s.blobs.put(u.blob_hash, blobs[u.blob_hash], height=block.height)
        junk = os.urandom(2000)  # an orphan every height
        s.blobs.put(digest(junk), junk, height=block.height)
        _commit(s, entry)
        s.prune_blobs(block.height, retention)
        sizes.append(sum(p.stat().st_size for _, p in s.blobs.files.scan()))
    assert max(sizes) <= (retention + 2) * (per_height + 2000)
    assert sizes[-1] <= sizes[retention + 2] + per_height  # flat, not growing
    assert s.conn.execute("SELECT COUNT(*) FROM blob_index").fetchone()[0] <= (retention + 2) * 6
    s.close()
    report = verify_chain(ChainStore.open(tmp_path / "c.sqlite", readonly=True), g)
    assert report.ok and report.reexecuted == [37, 40], report


def test_blob_retention_setting(tmp_path: Path) -> None:
    assert NodeConfig().blob_retention_heights == 0
    assert load_config(tmp_path, {}, {"FLNODE_BLOB_RETENTION_HEIGHTS": "256"}).config.blob_retention_heights == 256
    write_config(tmp_path, NodeConfig(blob_retention_heights=64))
    assert load_config(tmp_path).config.blob_retention_heights == 64
    with pytest.raises(ConfigError, match="blob_retention_heights"):
        load_config(tmp_path, {}, {"FLNODE_BLOB_RETENTION_HEIGHTS": "lots"})


# ---------------------------------------------------------------- streamed blobs


def test_a_streamed_blob_is_hashed_once_and_appears_only_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flnode.node.chain.blob_store as store_mod

    s = ChainStore.open(tmp_path / "chain.sqlite")
    data = os.urandom(3 * (1 << 20) + 17)
    h = digest(data)
    calls: list[int] = []
    monkeypatch.setattr(store_mod, "digest", lambda b: calls.append(len(b)) or digest(b))  # type: ignore[func-returns-value]
    sink = s.blobs.sink(h)
    for at in range(0, len(data), 1 << 20):
        sink.write(data[at : at + (1 << 20)])
        assert not s.blobs.has(h) and s.blobs.reader(h) is None  # nothing under the hash name yet
    assert sink.tmp.exists()
    assert sink.commit()
    s.blobs.adopt(h, sink.size, 5)
    assert calls == []  # the sink's running hash was the only pass
    assert not sink.tmp.exists() and s.blobs.has(h)
    r = s.blobs.reader(h)
    assert r is not None and r.size == len(data) and bytes(r.read_at(100, 50)) == data[100:150]
    assert calls == []
    r.close()
    model = b"the model of height 1"
    staged = s.blobs.stage_height(1, digest(model), model, set(), None, {})
    assert (h, len(data), 5, "update") in staged.upserts  # the next commit indexes it for its announced height
    s.close()


def test_a_streamed_blob_that_does_not_match_leaves_nothing(tmp_path: Path) -> None:
    s = ChainStore.open(tmp_path / "chain.sqlite")
    h = digest(b"what was asked for")
    sink = s.blobs.sink(h)
    sink.write(b"something else")
    assert not sink.commit()
    assert not s.blobs.has(h) and not sink.tmp.exists()
    assert [p for _, p in s.blobs.files.scan()] == []
    s.close()


def test_a_crash_mid_stream_leaves_a_temporary_file_that_open_removes(tmp_path: Path) -> None:
    script = f"""
import os, sys
from flnode.node.chain.store import ChainStore
from flnode.protocol.hashing import digest
s = ChainStore.open(__import__('pathlib').Path({str(tmp_path / 'c.sqlite')!r}))
data = os.urandom(1 << 22)
sink = s.blobs.sink(digest(data))
sink.write(data[: 1 << 21])
print(sink.tmp, flush=True)
os._exit(9)  # no commit, no cleanup: a torn temporary file
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    tmp = Path(out.stdout.strip())
    assert tmp.exists() and tmp.name.startswith(".tmp-")
    assert all(h is None for h, _ in ChainStore.open(tmp_path / "c.sqlite", readonly=True).blobs.files.scan())
    s = ChainStore.open(tmp_path / "c.sqlite")
    assert not tmp.exists() and list(s.blobs.files.scan()) == []
    s.close()


def test_a_file_from_before_a_restart_is_hashed_once_and_dropped_if_corrupt(tmp_path: Path) -> None:
    s = ChainStore.open(tmp_path / "c.sqlite")
    good, bad = os.urandom(5000), os.urandom(5000)
    s.blobs.put(digest(good), good)
    s.blobs.put(digest(bad), bad)
    model = b"the model of height 1"
    staged = s.blobs.stage_height(1, digest(model), model, set(), None, {})
    s.db.transaction(staged.index)  # indexed, as a height's commit does: open does not read indexed files
    s.blobs.committed(staged)
    s.close()
    s = ChainStore.open(tmp_path / "c.sqlite")
    s.blobs.files.path(digest(bad)).write_bytes(os.urandom(5000))
    r = s.blobs.reader(digest(good))
    assert r is not None and bytes(r.read_at(0, 5000)) == good
    assert s.blobs.reader(digest(bad)) is None and not s.blobs.has(digest(bad))
    s.close()


def test_commit_height_streams_the_model_to_its_file(tmp_path: Path, chain8: Chain) -> None:
    _, entries, _ = chain8
    s = ChainStore.open(tmp_path / "c.sqlite")
    for block, cert, state, receipt in entries[:3]:
        s.commit_height(block, cert, state, receipt, state.model)  # tensors, not an encoded blob
        assert s.blobs.get(state.model_hash) == encode_tensors(state.model)
        assert _index(s, state.model_hash) == (len(encode_tensors(state.model)), block.height, "model")
    s.close()


def test_the_blob_service_streams_in_and_out(tmp_path: Path) -> None:
    import trio
    from flnode.node.blobs import BlobService
    from flnode.node.metrics import Metrics
    from flnode.node.net import StreamedResponse
    from flnode.node.store_worker import StoreWorker
    from flnode.protocol.messages import BlobRequest

    store = ChainStore.open(tmp_path / "c.sqlite")
    data = os.urandom(9 * (1 << 20) + 3)
    h = digest(data)

    class FakeNet:
        peer_id = "me"
        pieces = 0

        async def request_into(self, peer: str, protocol_id: str, payload: bytes, sink: Any, *,
                               max_response: int, timeout: float, idle_timeout: float | None = None) -> int:
            body = data if peer == "good" else os.urandom(len(data))
            for at in range(0, len(body), 65536):
                await sink(body[at : at + 65536])
                FakeNet.pieces += 1
            return len(body)

    async def main() -> None:
        svc = BlobService(FakeNet(), StoreWorker(store), Metrics(), max_blob_bytes=64 << 20)  # type: ignore[arg-type]
        assert not await svc.fetch(h, ["liar"], len(data), height=2)
        assert svc.metrics.counters["rejected_blob_hash_mismatch"] == 1 and not store.blobs.has(h)
        assert await svc.fetch(h, ["good"], len(data), height=2)
        assert svc.holds(h) and store.blobs.get(h) == data
        resp = await svc.serve("peer", BlobRequest(h).encode())
        assert isinstance(resp, StreamedResponse) and resp.size == len(data)
        got = [p async for p in resp.chunks()]
        assert max(len(p) for p in got) <= 1 << 20 and b"".join(got) == data
        readers = await svc.readers([h, digest(b"absent")])
        assert list(readers) == [h] and bytes(readers[h].read_at(len(data) - 3, 3)) == data[-3:]

    trio.run(main)
    assert [p.name for _, p in store.blobs.files.scan()] == [h.hex()]  # no temporary file left behind
    store.close()
