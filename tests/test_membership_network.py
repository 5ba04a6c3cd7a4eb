"""Open membership with real node processes on 127.0.0.1: a trainer joins a running 4-validator network."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flnode.cli.demo import NodeView, free_ports, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet, open_membership_rules
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


def signers_anywhere(homes: list[Path], lo: int) -> dict[int, set[bytes]]:
    """Who signed each height's certificate in any of these homes (each node stores the precommits it decided
    with: a quorum, so the slowest validator may be missing from one node's certificates and not another's)."""
    out: dict[int, set[bytes]] = {}
    for home in homes:
        for h, s in signers(home, lo).items():
            out.setdefault(h, set()).update(s)
    return out


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


def start_join(home: Path, genesis: Path, addrs: list[tuple[str, str]], role: str) -> subprocess.Popen[bytes]:
    log = open(home / "node.log", "ab")  # noqa: SIM115 - handed to the child
    # it dials every validator: a follower decides a height from their votes
    return subprocess.Popen(
        [sys.executable, "-m", "flnode.cli.main", "join", "--home", str(home), "--role", role, "--genesis",
         str(genesis), *(x for _, a in addrs for x in ("--bootstrap", a))],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def test_trainer_and_validator_join_and_a_validator_leaves_while_committing(tmp_path: Path) -> None:
    """Open admission, 4 validators: a trainer and a validator join; each counts from h+2 (the trainer's updates
    are in blocks, the validator signs certificates); then a genesis validator leaves and signs no certificate
    from h+2; the network keeps committing, every model matches and chain verify passes."""
    ports = free_ports(6)
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 1500)
    rules.update(open_membership_rules(task, 4, "open"))
    addrs = create_testnet(tmp_path, 4, chain_id="join-test", host="127.0.0.1", listen_host="127.0.0.1",
                           ports=ports[:4], task_rules=(task, rules), force=True)
    views = [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(4)]
    trainer, validator = tmp_path / "hospital", tmp_path / "v5"
    for home, port in ((trainer, ports[4]), (validator, ports[5])):
        res = flnode("init", "--home", str(home), "--moniker", home.name, "--port", str(port))
        assert res.returncode == 0, res.stderr
    t_key, v_key = (NodeKey.load(h / "node_key.json").public_key for h in (trainer, validator))
    leaver = NodeKey.load(views[3].home / "node_key.json").public_key
    everyone = [*views, NodeView("hospital", trainer), NodeView("v5", validator)]
    procs = [start_node(v.home) for v in views]
    try:
        wait_until("height 2", lambda: min(heights(views)) >= 2, 90, views[0].home)
        procs.append(start_join(trainer, views[0].home / "genesis.json", addrs, "trainer"))
        procs.append(start_join(validator, views[0].home / "genesis.json", addrs, "validator"))
        db = views[0].home
        wait_until("joins committed", lambda: None not in (tx_height(db, TxKind.JOIN, t_key),
                                                           tx_height(db, TxKind.JOIN, v_key)), 60, trainer)
        ht = tx_height(db, TxKind.JOIN, t_key)
        # open admission admits the trainer at once; the validator seat needs > 2/3 of the power to admit it
        out = json.loads(flnode("members", "--home", str(views[1].home), "--json").stdout)
        asked = [r for r in out["members"] if r["moniker"] == "v5"]
        assert [(r["since"], r["power"], r["status"].split()[0]) for r in asked] == [(None, 0, "requested")]
        for v in views[:3]:
            assert flnode("admit", "--home", str(v.home), "v5").returncode == 0

        def seat() -> dict[str, object] | None:
            rows = json.loads(flnode("members", "--home", str(views[1].home), "--json").stdout)["members"]
            return next((r for r in rows if r["moniker"] == "v5" and r["since"] is not None), None)

        wait_until("admitted", lambda: seat() is not None, 60, validator)
        admitted = seat()
        assert ht is not None and admitted is not None
        hv = int(admitted["since"]) - 2  # type: ignore[call-overload]
        out = json.loads(flnode("members", "--home", str(views[1].home), "--json").stdout)
        row = {r["moniker"]: r for r in out["members"]}
        assert row["hospital"]["role"] == "trainer" and row["hospital"]["since"] == ht + 2
        assert row["hospital"]["power"] == 0 and row["v5"]["role"] == "validator"
        wait_until("the trainer's updates", lambda: len(chain_facts(db, t_key)[1]) >= 2, 60, trainer)
        homes = [v.home for v in views] + [validator]
        wait_until("the new validator signs", lambda: any(v_key in s for s in signers_anywhere(homes, 1).values()),
                   60, validator)
        assert flnode("leave", "--home", str(views[3].home)).returncode == 0
        wait_until("leave committed", lambda: tx_height(db, TxKind.LEAVE, leaver) is not None, 60, views[3].home)
        hl = tx_height(db, TxKind.LEAVE, leaver)
        assert hl is not None
        wait_until("commits after the leave", lambda: min(heights(everyone)) >= hl + 4, 60, views[0].home)
    finally:
        stop_nodes(procs)
    _, contributed = chain_facts(db, t_key)
    assert contributed and min(contributed) >= ht + 2, (ht, contributed)
    sig = signers_anywhere(homes, 1)
    assert all(v_key not in s for h, s in sig.items() if h < hv + 2)  # it counts from h + 2 only
    assert any(v_key in s for h, s in sig.items() if h >= hv + 2)
    assert all(leaver not in s for h, s in sig.items() if h >= hl + 2)  # a leaver's votes no longer count
    h = min(heights(everyone))
    assert len({model_hash_at(v.home, h) for v in everyone}) == 1
    for home in (views[2].home, trainer, validator):
        res = flnode("chain", "verify", "--home", str(home), timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
