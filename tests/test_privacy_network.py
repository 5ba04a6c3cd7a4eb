"""Differential privacy on a real 4-node network (real processes on 127.0.0.1): a participant runs out of its
epsilon budget mid-run, stops training by itself, a forced further update of its is refused with reason
privacy_budget_spent, and the network keeps committing; every node and `chain verify` agree on epsilon."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flnode.cli.demo import NodeView, free_ports, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet
from flnode.node.app import privacy
from flnode.node.chain.store import ChainStore, StoreError
from flnode.protocol.genesis import Genesis
from netutil import heights, log_tail, read_store

pytestmark = pytest.mark.slow

FORCED = Path(__file__).with_name("dp_forced_node.py")


def wait_until(cond: Any, views: list[NodeView], procs: list[subprocess.Popen[bytes]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        dead = [v.name for v, p in zip(views, procs, strict=True) if p.poll() is not None]
        assert not dead, f"{dead} exited: {log_tail(views[0].home)}"
        assert time.monotonic() < deadline, f"{what}: timed out at heights {heights(views)}; {log_tail(views[0].home)}"
        time.sleep(0.25)


def test_budget_runs_out_mid_run(tmp_path: Path) -> None:
    n = 4
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 800)
    rules.update(timeout_propose_ms=1500, timeout_propose_delta_ms=300, timeout_prevote_ms=500,
                 timeout_prevote_delta_ms=200, timeout_precommit_ms=500, timeout_precommit_delta_ms=200,
                 dp_mode="record", dp_sample_rate=0.1, dp_noise=2.0, dp_clip=1.0)
    create_testnet(tmp_path, n, chain_id="dp-net", host="127.0.0.1", listen_host="127.0.0.1", ports=free_ports(n),
                   task_rules=(task, rules), force=True)
    g = Genesis.load(tmp_path / "node0" / "genesis.json")
    # node3 may spend two rounds: its budget lies between epsilon after 2 and after 3 rounds.
    e2, e3 = (privacy.epsilon(g, g.validators[3].key_bytes, k) for k in (2, 3))
    for i in range(n):
        path = tmp_path / f"node{i}" / "genesis.json"
        raw = Genesis.load(path).to_json_dict()
        raw["rules"]["dp_budgets"] = {"node3": round((e2 + e3) / 2, 3)}
        Genesis.from_json_dict(raw).save(path)
    g = Genesis.load(tmp_path / "node0" / "genesis.json")
    me = g.validators[3].key_bytes
    views = [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(n)]
    procs = [start_node(v.home) for v in views]
    try:
        # Rounds are charged when a block lists its update (one that arrives too late is not listed).
        def charged() -> tuple[int, int]:
            def f(st: ChainStore) -> tuple[int, int]:
                top = st.latest_height()
                return top, st.light_state(top).dp_rounds.get(me, 0) if top else 0
            try:  # the node may not have created its store (or its tables) yet
                return read_store(views[0].home, f)  # type: ignore[no-any-return]
            except (OSError, StoreError):
                return 0, 0

        wait_until(lambda: charged()[1] >= 2, views, procs, 90, "node3 charged two rounds")
        h2 = charged()[0]
        # Then it stops by itself: nothing of its is listed in the next three heights.
        wait_until(lambda: min(heights(views)) >= h2 + 3, views, procs, 60, "three more heights")
        listed = read_store(views[0].home, lambda st: [me in {u.author for u in st.get_block(h).updates}
                                                       for h in range(h2 + 1, h2 + 4)])
        assert listed == [False, False, False]
        assert charged()[1] == 2
        assert "privacy budget spent: training stopped" in (views[3].home / "node.log").read_text()

        # Forced: node3 restarts as a node that ignores its budget; its next update is refused.
        stop_nodes([procs[3]])
        procs[3] = subprocess.Popen(
            [sys.executable, str(FORCED), "--home", str(views[3].home)], stdout=open(views[3].home / "node.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def refused() -> int | None:
            def find(s: ChainStore) -> int | None:
                for h in range(h2 + 1, s.latest_height() + 1):
                    r = s.get_receipt(h)
                    if any(a == me and why == "privacy_budget_spent" for a, _, why in r.rejected):
                        return h
                return None
            return read_store(views[0].home, find)  # type: ignore[no-any-return]

        wait_until(lambda: refused() is not None, views, procs, 60, "a refused forced update")
        h_refused = refused()
        assert h_refused is not None
        wait_until(lambda: min(heights(views)) >= h_refused + 2, views, procs, 60, "commits after the refusal")
    finally:
        stop_nodes(procs)
    top = min(heights(views))
    # Every node computes the same epsilon per participant; node3's stayed at two rounds, within its budget.
    reports = [read_store(v.home, lambda s: privacy.report(g, s.light_state(top))) for v in views]
    assert all(r == reports[0] for r in reports)
    row = next(r for r in reports[0] if r["name"] == "node3")
    assert row["rounds"] == 2 and row["exhausted"] and row["epsilon_spent"] <= row["epsilon_budget"]
    # each honest participant is charged exactly the heights whose block lists its update (late ones are not)
    listed = read_store(views[0].home, lambda s: [{u.author for u in s.get_block(h).updates} for h in range(1, top + 1)])
    for v in g.validators[:3]:  # node3's forced updates are listed and refused (privacy_budget_spent), not charged
        charged_rounds = next(r["rounds"] for r in reports[0] if r["name"] == v.name)
        assert charged_rounds == sum(v.key_bytes in authors for authors in listed), v.name
    assert all(r["rounds"] >= top // 2 for r in reports[0] if r["name"] != "node3")  # honest ones take part
    res = subprocess.run([sys.executable, "-m", "flnode.cli.main", "chain", "verify", "--home", str(views[0].home)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
