"""Open membership with real node processes on 127.0.0.1: a trainer joins a running 4-validator network."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flnode.cli.demo import NodeView, free_ports, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet
from flnode.node.chain.store import ChainStore
from flnode.protocol.crypto import NodeKey
from flnode.protocol.membership import TxKind
from netutil import heights, model_hash_at

pytestmark = pytest.mark.slow


def flnode(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flnode.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def wait_until(what: str, cond: object, timeout: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s; log: {(logs / 'node.log').read_text()[-3000:]}")


def chain_facts(home: Path, me: bytes) -> tuple[int | None, list[int]]:
    """(height of the block carrying `me`'s join, heights whose blocks hold an update of `me`)."""
    store = ChainStore.open(home / "data" / "chain.sqlite", readonly=True)
    try:
        joined, updates = None, []
        for h in range(1, store.latest_height() + 1):
            b = store.get_block(h)
            assert b is not None
            if any(t.kind == TxKind.JOIN and t.signer == me for t in b.txs):
                joined = h
            if any(u.author == me for u in b.updates):
                updates.append(h)
        return joined, updates
    finally:
        store.close()


def test_trainer_joins_open_network_and_contributes_from_h_plus_2(tmp_path: Path) -> None:
    ports = free_ports(5)
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 1500)
    rules["admission"] = "open"
    addrs = create_testnet(tmp_path, 4, chain_id="join-test", host="127.0.0.1", listen_host="127.0.0.1",
                           ports=ports[:4], task_rules=(task, rules), force=True)
    views = [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(4)]
    joiner = tmp_path / "joiner"
    res = flnode("init", "--home", str(joiner), "--moniker", "hospital", "--port", str(ports[4]))
    assert res.returncode == 0, res.stderr
    me = NodeKey.load(joiner / "node_key.json").public_key
    procs = [start_node(v.home) for v in views]
    log = open(joiner / "node.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        wait_until("height 2", lambda: min(heights(views)) >= 2, 90, views[0].home)
        join = subprocess.Popen(
            [sys.executable, "-m", "flnode.cli.main", "join", "--home", str(joiner), "--genesis",
             str(views[0].home / "genesis.json"), *(x for _, a in addrs for x in ("--bootstrap", a))],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(join)  # it dials every validator: a follower decides a height from their votes
        wait_until("join committed", lambda: chain_facts(views[0].home, me)[0] is not None, 60, joiner)
        hj = chain_facts(views[0].home, me)[0]
        assert hj is not None
        out = json.loads(flnode("members", "--home", str(views[1].home), "--json").stdout)
        row = next(r for r in out["members"] if r["moniker"] == "hospital")
        assert row["role"] == "trainer" and row["since"] == hj + 2 and row["power"] == 0
        wait_until("joiner's updates", lambda: len(chain_facts(views[0].home, me)[1]) >= 2, 60, joiner)
        target = max(heights(views)) + 1
        wait_until("joiner synced", lambda: min(heights([*views, NodeView("j", joiner)])) >= target, 60, joiner)
    finally:
        stop_nodes(procs)
        log.close()
    _, contributed = chain_facts(views[0].home, me)
    assert contributed and min(contributed) >= hj + 2, (hj, contributed)
    h = min(heights([*views, NodeView("j", joiner)]))
    assert len({model_hash_at(home, h) for home in [*(v.home for v in views), joiner]}) == 1
    for home in (views[2].home, joiner):
        res = flnode("chain", "verify", "--home", str(home), timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr


def signers(home: Path, lo: int) -> dict[int, set[bytes]]:
    """Who signed each certificate from height `lo` on."""
    store = ChainStore.open(home / "data" / "chain.sqlite", readonly=True)
    try:
        out = {}
        for h in range(lo, store.latest_height() + 1):
            cert = store.get_certificate(h)
            assert cert is not None
            out[h] = {k for k, _ in cert.signatures}
        return out
    finally:
        store.close()


def tx_height(home: Path, kind: TxKind, signer: bytes) -> int | None:
    store = ChainStore.open(home / "data" / "chain.sqlite", readonly=True)
    try:
        for h in range(1, store.latest_height() + 1):
            b = store.get_block(h)
            if b is not None and any(t.kind == kind and t.signer == signer for t in b.txs):
                return h
        return None
    finally:
        store.close()


def test_validator_joins_and_another_leaves_while_committing(tmp_path: Path) -> None:
    ports = free_ports(5)
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 1500)
    rules["admission"] = "open"
    addrs = create_testnet(tmp_path, 4, chain_id="val-test", host="127.0.0.1", listen_host="127.0.0.1",
                           ports=ports[:4], task_rules=(task, rules), force=True)
    views = [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(4)]
    joiner = tmp_path / "joiner"
    assert flnode("init", "--home", str(joiner), "--moniker", "v5", "--port", str(ports[4])).returncode == 0
    me = NodeKey.load(joiner / "node_key.json").public_key
    leaver = NodeKey.load(views[3].home / "node_key.json").public_key
    procs = [start_node(v.home) for v in views]
    log = open(joiner / "node.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        wait_until("height 2", lambda: min(heights(views)) >= 2, 90, views[0].home)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "flnode.cli.main", "join", "--home", str(joiner), "--role", "validator",
             "--genesis", str(views[0].home / "genesis.json"), *(x for _, a in addrs for x in ("--bootstrap", a))],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        wait_until("join committed", lambda: tx_height(views[0].home, TxKind.JOIN, me) is not None, 60, joiner)
        hj = tx_height(views[0].home, TxKind.JOIN, me)
        assert hj is not None
        wait_until("the new validator signs", lambda: any(me in s for s in signers(views[0].home, 1).values()),
                   60, joiner)
        assert flnode("leave", "--home", str(views[3].home)).returncode == 0
        wait_until("leave committed", lambda: tx_height(views[0].home, TxKind.LEAVE, leaver) is not None, 60,
                   views[3].home)
        hl = tx_height(views[0].home, TxKind.LEAVE, leaver)
        assert hl is not None
        wait_until("commits after the leave", lambda: min(heights(views[:3])) >= hl + 5, 60, views[0].home)
    finally:
        stop_nodes(procs)
        log.close()
    sig = signers(views[0].home, 1)
    assert all(me not in s for h, s in sig.items() if h < hj + 2)  # it counts from h + 2 only
    assert any(me in s for h, s in sig.items() if h >= hj + 2)
    assert all(leaver not in s for h, s in sig.items() if h >= hl + 2)  # a leaver's votes no longer count
    h = min(heights([*views, NodeView("j", joiner)]))
    assert len({model_hash_at(home, h) for home in [*(v.home for v in views), joiner]}) == 1
    for home in (views[0].home, joiner):
        res = flnode("chain", "verify", "--home", str(home), timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
