"""Real node processes on 127.0.0.1: rounds commit, crash/restart, late join, hostile peer.

Each test starts real `flnode start` processes and waits in bounded loops for heights read from their stores.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flnode.cli.demo import NodeView, free_ports, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet
from netutil import heights, model_hash_at

pytestmark = pytest.mark.slow


_heights = heights


def wait_for(views: list[NodeView], height: int, timeout: float, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hs = _heights(views)
        if all(h >= height for h in hs):
            return
        if procs:
            dead = [i for i, p in enumerate(procs) if p is not None and p.poll() is not None]
            assert not dead, f"node(s) {dead} exited: " + _tail(views[dead[0]].home)
        time.sleep(0.1)
    raise AssertionError(f"heights {_heights(views)} did not all reach {height} in {timeout}s; log: {_tail(views[0].home)}")


def _tail(home: Path, n: int = 2500) -> str:
    try:
        return (home / "node.log").read_text()[-n:]
    except OSError:
        return "(no log)"


def chain_verify(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flnode.cli.main", "chain", "verify", "--home", str(home)],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def testnet(tmp_path: Path) -> Iterator[tuple[Path, list[NodeView]]]:
    n = 4
    ports = free_ports(n)
    create_testnet(
        tmp_path, n, chain_id="net-test", host="127.0.0.1", listen_host="127.0.0.1", ports=ports,
        task_rules=_task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 1500), force=True,
    )
    yield tmp_path, [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(n)]


def test_four_nodes_commit_identical_models_and_verify(testnet: tuple[Path, list[NodeView]]) -> None:
    _, views = testnet
    procs = [start_node(v.home) for v in views]
    try:
        wait_for(views, 5, timeout=90, procs=procs)
    finally:
        stop_nodes(procs)
    assert all(p.returncode is not None for p in procs)
    hashes = {model_hash_at(v.home, 5) for v in views}
    assert len(hashes) == 1, hashes
    for v in views:
        res = chain_verify(v.home)
        assert res.returncode == 0, res.stdout + res.stderr


def test_kill9_and_restart_catches_up(testnet: tuple[Path, list[NodeView]]) -> None:
    _, views = testnet
    procs = [start_node(v.home) for v in views]
    try:
        wait_for(views, 2, timeout=90, procs=procs)
        procs[3].send_signal(signal.SIGKILL)
        procs[3].wait(10)
        target = max(_heights(views[:3])) + 3
        wait_for(views[:3], target, timeout=90)
        procs[3] = start_node(views[3].home)
        wait_for(views, target + 1, timeout=90, procs=procs)
    finally:
        stop_nodes(procs)
    h = min(_heights(views))
    assert len({model_hash_at(v.home, h) for v in views}) == 1
    res = chain_verify(views[3].home)
    assert res.returncode == 0, res.stdout + res.stderr


def test_late_joiner_syncs_from_genesis(testnet: tuple[Path, list[NodeView]]) -> None:
    _, views = testnet
    procs: list[subprocess.Popen[bytes]] = [start_node(v.home) for v in views[:3]]
    try:
        wait_for(views[:3], 4, timeout=90, procs=procs)
        late = start_node(views[3].home)
        procs.append(late)
        target = max(_heights(views[:3])) + 1
        wait_for(views, target, timeout=90, procs=procs)
    finally:
        stop_nodes(procs)
    h = min(_heights(views))
    assert len({model_hash_at(v.home, h) for v in views}) == 1
