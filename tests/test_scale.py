"""Sixteen real node processes on 127.0.0.1 (on a 2-core machine) commit five heights with identical models.

Consensus runs over direct validator streams with a start-up gate; before, 16 nodes on gossip never committed a
height. The speed of larger networks is measured in bench/bench_scale.py, not asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flnode.cli.demo import NodeView, free_ports, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet
from netutil import model_hashes_at
from test_network import chain_verify, wait_for

pytestmark = pytest.mark.slow


def test_sixteen_nodes_commit_five_heights_with_identical_models(tmp_path: Path) -> None:
    n = 16
    create_testnet(
        tmp_path, n, chain_id="scale-test", host="127.0.0.1", listen_host="127.0.0.1", ports=free_ports(n),
        task_rules=_task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 2000), force=True,
    )
    views = [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(n)]
    procs = [start_node(v.home) for v in views]
    try:
        wait_for(views, 5, 240, procs)
    finally:
        stop_nodes(procs)
    for h in range(1, 6):
        assert len(model_hashes_at(views, h)) == 1, f"models differ at height {h}"
    res = chain_verify(views[5].home)
    assert res.returncode == 0, res.stdout + res.stderr
