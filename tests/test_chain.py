"""node/chain: a real in-process chain (real keys, execution, certificates), stored, audited and tampered with;
block checks; crash safety of the store under kill -9; the chain CLI."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from flnode.cli.main import app
from flnode.cli.node_cmd import _task_and_rules, make_genesis
from flnode.node.app import genesis_state, make_update, participant_data
from flnode.node.app.blocks import build_block, check_block, missing_blobs
from flnode.node.chain.store import ChainStore, StoreError
from flnode.node.chain.verify import genesis_block_hash, verify_chain
from flnode.node.config import NodeConfig, write_config
from flnode.protocol.crypto import NodeKey
from flnode.protocol.errors import ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest
from flnode.protocol.messages import Block, CommitCertificate, DuplicateVoteEvidence, Vote, VoteType
from flnode.protocol.tensors import encode_tensors
from typer.testing import CliRunner

KEYS = [NodeKey(bytes([i + 40]) * 32) for i in range(4)]


def make_chain(
    heights: int,
    evidence: dict[int, list[DuplicateVoteEvidence]] | None = None,
    signers: Callable[[int], list[NodeKey]] = lambda h: KEYS[:3],
    proposer_of: Callable[[int], NodeKey] = lambda h: KEYS[h % 4],
) -> tuple[Genesis, list[tuple[Block, CommitCertificate, object, object]], dict[bytes, bytes]]:
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 2000)
    g = make_genesis("chain-test", [(f"n{i}", k.public_key) for i, k in enumerate(KEYS)], task, rules)
    state = genesis_state(g)
    prev, last_cert = genesis_block_hash(g), None
    data = {k.public_key: participant_data(g.task, 4, g.index_of(k.public_key)) for k in KEYS}
    blobs: dict[bytes, bytes] = {}
    out = []
    for h in range(1, heights + 1):
        cands = []
        for k in KEYS:
            ann, blob, _ = make_update(g, k, state, data[k.public_key], g.index_of(k.public_key))
            blobs[ann.blob_hash] = blob
            cands.append((ann, blob))
        block, state, receipt = build_block(g, state, prev_block_hash=prev, last_commit=last_cert,
                                            proposer=proposer_of(h).public_key, time_ms=h, candidates=cands,
                                            evidence=(evidence or {}).get(h, []))
        cert = certify(g, block, signers(h))
        out.append((block, cert, state, receipt))
        prev, last_cert = block.hash(), cert
    return g, out, blobs


def certify(g: Genesis, block: Block, keys: list[NodeKey]) -> CommitCertificate:
    h = block.height
    sigs = sorted(
        (k.public_key, Vote(VoteType.PRECOMMIT, h, 0, block.hash(), k.public_key).signed(k, g.chain_id).signature)
        for k in keys
    )
    return CommitCertificate(h, 0, block.hash(), tuple(sigs))


def store_chain(path: Path, g: Genesis, chain: list, blobs: dict[bytes, bytes]) -> None:  # type: ignore[type-arg]
    s = ChainStore.open(path, genesis_hash=g.hash())
    for h, b in blobs.items():
        s.blobs.put(h, b)
    for block, cert, state, receipt in chain:
        s.commit_height(block, cert, state, receipt, encode_tensors(state.model))
    s.close()


@pytest.fixture(scope="module")
def chain() -> tuple[Genesis, list, dict[bytes, bytes]]:  # type: ignore[type-arg]
    return make_chain(4)


def test_store_round_trip_and_verify(tmp_path: Path, chain: tuple) -> None:  # type: ignore[type-arg]
    g, blocks, blobs = chain
    db = tmp_path / "c.sqlite"
    store_chain(db, g, blocks, blobs)
    reader = ChainStore.open(db, readonly=True, genesis_hash=g.hash())
    assert reader.latest_height() == 4
    for block, cert, state, receipt in blocks:
        h = block.height
        assert reader.get_block(h) == block and reader.get_certificate(h) == cert
        assert reader.get_state(h).hash() == state.hash() and reader.get_receipt(h) == receipt
    report = verify_chain(reader, g)
    assert report.ok and report.heights == 4, report.reason
    reader.close()
    with pytest.raises(StoreError, match="another genesis"):
        ChainStore.open(db, genesis_hash=digest(b"other"))


def test_reader_works_beside_a_writer(tmp_path: Path, chain: tuple) -> None:  # type: ignore[type-arg]
    g, blocks, blobs = chain
    db = tmp_path / "c.sqlite"
    writer = ChainStore.open(db, genesis_hash=g.hash())
    block, cert, state, receipt = blocks[0]
    writer.commit_height(block, cert, state, receipt, encode_tensors(state.model))
    reader = ChainStore.open(db, readonly=True)
    assert reader.latest_height() == 1
    block2, cert2, state2, receipt2 = blocks[1]
    writer.commit_height(block2, cert2, state2, receipt2, encode_tensors(state2.model))
    assert reader.latest_height() == 2
    reader.close()
    writer.close()


def _blob_file(db: Path, h: bytes) -> Path:
    return ChainStore.open(db, readonly=True).blobs.files.path(h)


@pytest.mark.parametrize("what", ["update blob", "certificate", "state row", "receipt", "model blob"])
def test_verify_names_the_first_tampered_height(tmp_path: Path, chain: tuple, what: str) -> None:  # type: ignore[type-arg]
    g, blocks, blobs = chain
    db = tmp_path / "c.sqlite"
    store_chain(db, g, blocks, blobs)
    conn = sqlite3.connect(db)
    h = 3
    block, cert, state, receipt = blocks[h - 1]
    if what == "update blob":
        _blob_file(db, block.updates[0].blob_hash).write_bytes(b"junk")
    elif what == "certificate":
        bad = replace(cert, signatures=((cert.signatures[0][0], b"\x00" * 64), *cert.signatures[1:]))
        conn.execute("UPDATE certificates SET data = ? WHERE height = ?", (bad.encode(), h))
    elif what == "state row":
        other = replace(state, balances={**state.balances, KEYS[0].public_key: 10**6})
        from flnode.node.app import encode_state

        conn.execute("UPDATE states SET data = ? WHERE height = ?", (encode_state(other), h))
    elif what == "receipt":
        conn.execute("UPDATE receipts SET data = ? WHERE height = ?", (replace(receipt, rewards={}).encode(), h))
    else:
        _blob_file(db, state.model_hash).write_bytes(b"junk")
    conn.commit()
    conn.close()
    report = verify_chain(ChainStore.open(db, readonly=True), g)
    assert not report.ok and report.first_bad_height == h, report


def test_check_block_refusals(chain: tuple) -> None:  # type: ignore[type-arg]
    g, blocks, blobs = chain
    state0 = genesis_state(g)
    powers = g.powers
    prev0 = genesis_block_hash(g)
    b1 = blocks[0][0]
    check_block(g, state0, b1, blobs, prev_block_hash=prev0, validator_powers=powers)

    def refused(block: Block, match: str, prev: bytes = prev0, state: object = state0, bl: dict = blobs) -> None:  # type: ignore[type-arg]
        with pytest.raises(ValidationError, match=match):
            check_block(g, state, block, bl, prev_block_hash=prev, validator_powers=powers)  # type: ignore[arg-type]

    refused(replace(b1, header=replace(b1.header, chain_id="x")), "chain")
    refused(replace(b1, header=replace(b1.header, height=2)), "height")
    refused(b1, "link", prev=digest(b"elsewhere"))
    refused(replace(b1, header=replace(b1.header, model_hash=digest(b"m"))), "model hash")
    refused(replace(b1, header=replace(b1.header, app_hash=digest(b"a"))), "app hash")
    refused(replace(b1, header=replace(b1.header, proposer=b"\x01" * 32)), "proposer")
    missing = {k: v for k, v in blobs.items() if k != b1.updates[0].blob_hash}
    refused(b1, "missing", bl=missing)
    assert missing_blobs(b1, lambda h: h in missing) == [b1.updates[0].blob_hash]
    b2 = blocks[1][0]
    s1 = blocks[0][2]
    refused(replace(b2, last_commit=None), "last commit|match", prev=b1.hash(), state=s1)


KILL_SCRIPT = """
import sys, pickle
from pathlib import Path
from flnode.node.chain.store import ChainStore
from flnode.protocol.tensors import encode_tensors
g, blocks, blobs = pickle.loads(Path(sys.argv[1]).read_bytes())
s = ChainStore.open(Path(sys.argv[2]), genesis_hash=g.hash())
for h, b in blobs.items():
    s.blobs.put(h, b)
start = s.latest_height()
print("ready", start, flush=True)
for block, cert, state, receipt in blocks[start:]:
    s.commit_height(block, cert, state, receipt, encode_tensors(state.model))
    for i in range(200):
        s.log.append(block.height + 1, b"r" * 100)
print("done", flush=True)
"""


def test_store_survives_kill9_at_any_moment(tmp_path: Path) -> None:
    import pickle

    g, blocks, blobs = make_chain(8)
    payload = tmp_path / "chain.pickle"
    payload.write_bytes(pickle.dumps((g, blocks, blobs)))
    db = tmp_path / "c.sqlite"
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    last = 0
    for attempt in range(6):
        p = subprocess.Popen([sys.executable, str(script), str(payload), str(db)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        line = p.stdout.readline()
        time.sleep(0.02 * attempt)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        s = ChainStore.open(db, readonly=True)
        h = s.latest_height()
        assert h >= last  # nothing committed is ever lost
        for k in range(1, h + 1):  # every committed height is whole
            assert s.get_block(k) == blocks[k - 1][0]
            assert s.get_state(k).hash() == blocks[k - 1][2].hash()
        s.close()
        last = h
        assert line.startswith("ready")
    report = verify_chain(ChainStore.open(db, readonly=True), g)
    assert report.ok, report.reason


def test_corrupt_store_is_a_typed_error(tmp_path: Path) -> None:
    bad = tmp_path / "c.sqlite"
    bad.write_bytes(b"not a database at all" * 200)
    with pytest.raises(StoreError):
        ChainStore.open(bad)
    with pytest.raises(StoreError):
        ChainStore.open(tmp_path / "absent.sqlite", readonly=True)


def home_with_chain(home: Path, g: Genesis, blocks: list, blobs: dict[bytes, bytes]) -> Path:  # type: ignore[type-arg]
    """A node home (genesis, config) whose store holds `blocks`, for the chain CLI."""
    home.mkdir()
    g.save(home / "genesis.json")
    write_config(home, NodeConfig())
    store_chain(home / "data" / "chain.sqlite", g, blocks, blobs)
    return home


def test_chain_cli(tmp_path: Path, chain: tuple) -> None:  # type: ignore[type-arg]
    g, blocks, blobs = chain
    home = home_with_chain(tmp_path / "home", g, blocks, blobs)
    runner = CliRunner()
    res = runner.invoke(app, ["chain", "verify", "--home", str(home)])
    assert res.exit_code == 0 and "4 blocks verified" in res.output
    res = runner.invoke(app, ["chain", "show", "--home", str(home), "--json"])
    assert res.exit_code == 0
    shown = json.loads(res.output)
    assert [b["height"] for b in shown["blocks"]] == [1, 2, 3, 4]
    assert all(b["accepted"] == 4 for b in shown["blocks"])
    res = runner.invoke(app, ["chain", "show", "--home", str(home), "--height", "2", "--json"])
    detail = json.loads(res.output)
    assert {p["name"] for p in detail["participants"]} == {"n0", "n1", "n2", "n3"}
    assert all(p["balance"] > 0 for p in detail["participants"])
    assert runner.invoke(app, ["chain", "show", "--home", str(home)]).exit_code == 0
    missing = runner.invoke(app, ["chain", "verify", "--home", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    conn = sqlite3.connect(home / "data" / "chain.sqlite")
    conn.execute("UPDATE receipts SET data = ? WHERE height = 2", (replace(blocks[1][3], rewards={}).encode(),))
    conn.commit()
    conn.close()
    res = runner.invoke(app, ["chain", "verify", "--home", str(home)])
    assert res.exit_code == 1 and "height 2" in res.output


# ---------------------------------------------------------------- slashing


def _double_vote(g_chain_id: str, key: NodeKey, height: int) -> DuplicateVoteEvidence:
    a = Vote(VoteType.PREVOTE, height, 0, b"\x01" * 32, key.public_key).signed(key, g_chain_id)
    b = Vote(VoteType.PREVOTE, height, 0, b"\x02" * 32, key.public_key).signed(key, g_chain_id)
    return DuplicateVoteEvidence.of(a, b)


def test_slashed_validator_stops_counting_from_h_plus_2(tmp_path: Path) -> None:
    bad = KEYS[0]
    ev = _double_vote("chain-test", bad, 1)
    # evidence in block 1: KEYS[0] has no power from height 3, so later certificates need KEYS[1..3] (all of 3)
    g, blocks, blobs = make_chain(
        5, evidence={1: [ev]}, signers=lambda h: KEYS[:3] if h < 3 else KEYS[1:],
        proposer_of=lambda h: KEYS[1 + h % 3],
    )
    from flnode.node.app import validator_powers

    s1 = blocks[0][2]
    assert s1.slashed == {bad.public_key: 3}
    assert bad.public_key in validator_powers(g, s1, 2)
    assert validator_powers(g, s1, 3) == {k.public_key: 1 for k in KEYS[1:]}
    db = tmp_path / "c.sqlite"
    store_chain(db, g, blocks, blobs)
    reader = ChainStore.open(db, readonly=True)
    assert reader.get_state(1).slashed == s1.slashed  # stored and decoded
    report = verify_chain(reader, g)
    reader.close()
    assert report.ok, report.reason

    # a certificate of height 3 signed with the slashed key is 2 of 3: verify names height 3
    conn = sqlite3.connect(db)
    conn.execute("UPDATE certificates SET data = ? WHERE height = 3", (certify(g, blocks[2][0], KEYS[:3]).encode(),))
    conn.commit()
    conn.close()
    report = verify_chain(ChainStore.open(db, readonly=True), g)
    assert not report.ok and report.first_bad_height == 3 and "2/3" in report.reason, report

    # check_block: block 4 whose last commit (height 3) counts the slashed key is refused; height 2 still counted it
    s2, s3 = blocks[1][2], blocks[2][2]
    b3, b4 = blocks[2][0], blocks[3][0]
    stale = replace(b4, last_commit=certify(g, b3, KEYS[:3]))
    stale = replace(stale, header=replace(stale.header, last_commit_hash=stale.last_commit.hash()))  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="2/3"):
        check_block(g, s3, stale, blobs, prev_block_hash=b3.hash())  # type: ignore[arg-type]
    check_block(g, s3, b4, blobs, prev_block_hash=b3.hash())  # type: ignore[arg-type]
    # its signature still has to be valid: it is checked, it just counts zero
    forged = replace(b4.last_commit, signatures=((bad.public_key, b"\x00" * 64), *b4.last_commit.signatures))  # type: ignore[union-attr]
    forged_b4 = replace(b4, last_commit=forged, header=replace(b4.header, last_commit_hash=forged.hash()))
    with pytest.raises(ValidationError, match="signature"):
        check_block(g, s3, forged_b4, blobs, prev_block_hash=b3.hash())  # type: ignore[arg-type]
    # the slashed validator may not propose from height 3 on, but still could at height 2
    b3_by_bad = replace(b3, header=replace(b3.header, proposer=bad.public_key))
    with pytest.raises(ValidationError, match="proposer"):
        check_block(g, s2, b3_by_bad, blobs, prev_block_hash=blocks[1][0].hash())  # type: ignore[arg-type]
    b2 = blocks[1][0]
    b2_by_bad = replace(b2, header=replace(b2.header, proposer=bad.public_key))
    check_block(g, s1, b2_by_bad, blobs, prev_block_hash=blocks[0][0].hash())  # type: ignore[arg-type]

    # chain show lists the slashing at the block that carried the evidence
    home = home_with_chain(tmp_path / "home", g, blocks, blobs)
    runner = CliRunner()
    shown = json.loads(runner.invoke(app, ["chain", "show", "--home", str(home), "--json"]).output)
    slashed = {b["height"]: b["slashed"] for b in shown["blocks"]}
    assert slashed[1] == [{"validator": "n0", "public_key": bad.public_key.hex(), "from_height": 3}]
    assert all(slashed[h] == [] for h in (2, 3, 4, 5))
    res = runner.invoke(app, ["chain", "show", "--home", str(home)], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "n0 (from 3)" in res.output
    detail = json.loads(runner.invoke(app, ["chain", "show", "--home", str(home), "--height", "1", "--json"]).output)
    assert detail["slashed"][0]["from_height"] == 3
    assert runner.invoke(app, ["chain", "verify", "--home", str(home)]).exit_code == 0
