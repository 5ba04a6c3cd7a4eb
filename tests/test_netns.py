"""Multi-host test: 4 Linux network namespaces joined by a bridge, one node process in each with its own IP.

Shows the nodes commit rounds with identical models across real (virtual) hosts, then cuts one host off (link
down) and restores it, and shows it catches up. Skipped with a reason where namespaces cannot be made.
Traffic stays inside the namespaces: the bridge lives in its own hub namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from flnode.cli.demo import NodeView, read_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet
from netutil import model_hashes_at

pytestmark = [pytest.mark.slow, pytest.mark.netns]

N = 4
SUBNET = "10.77.{}.{}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _can_make_namespaces() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    name = f"flprobe{uuid.uuid4().hex[:6]}"
    res = _ip("netns", "add", name, check=False)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


@pytest.fixture
def namespaces() -> Iterator[tuple[list[str], list[str], str]]:
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:4]
    net = int(tag, 16) % 200 + 20
    hub = f"flhub{tag}"
    names = [f"fl{tag}n{i}" for i in range(N)]
    ips = [SUBNET.format(net, i + 1) for i in range(N)]
    hub_links = []
    try:
        _ip("netns", "add", hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        _ip("-n", hub, "link", "set", "lo", "up")
        for i, ns in enumerate(names):
            _ip("netns", "add", ns)
            a, b = f"v{tag}{i}a", f"v{tag}{i}b"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", ns)
            _ip("link", "set", b, "netns", hub)
            _ip("-n", hub, "link", "set", b, "master", "br0")
            _ip("-n", hub, "link", "set", b, "up")
            _ip("-n", ns, "addr", "add", f"{ips[i]}/24", "dev", a)
            _ip("-n", ns, "link", "set", a, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hub_links.append(b)
        yield names, ips, hub
    finally:
        for ns in [*names, hub]:
            _ip("netns", "del", ns, check=False)


def _start_in(ns: str, home: Path) -> subprocess.Popen[bytes]:
    log = open(home / "node.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "flnode.cli.main", "start", "--home", str(home),
         "--log-format", "json"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )


def _wait(views: list[NodeView], height: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for v in views:
            read_node(v)
        if all(v.height >= height for v in views):
            return
        time.sleep(0.2)
    tail = (views[0].home / "node.log").read_text()[-2000:]
    raise AssertionError(f"heights {[v.height for v in views]} did not reach {height}: {tail}")


def test_four_hosts_commit_and_a_cut_host_catches_up(
    namespaces: tuple[list[str], list[str], str], tmp_path: Path
) -> None:
    names, ips, hub = namespaces
    create_testnet(
        tmp_path, N, chain_id="netns-test", hosts=ips, listen_host="0.0.0.0", same_port=True, base_port=26656,
        task_rules=_task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 1500), force=True,
    )
    views = [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(N)]
    procs = [_start_in(ns, v.home) for ns, v in zip(names, views, strict=True)]
    try:
        _wait(views, 3, timeout=120)
        tag = names[0][2:6]
        cut = f"v{tag}3b"
        _ip("-n", hub, "link", "set", cut, "down")
        cut_height = views[3].height
        target = max(v.height for v in views[:3]) + 3
        _wait(views[:3], target, timeout=120)
        read_node(views[3])
        assert views[3].height <= cut_height + 1, "the cut-off host kept committing without a network"
        _ip("-n", hub, "link", "set", cut, "up")
        _wait(views, target + 1, timeout=120)
    finally:
        stop_nodes(procs)
    assert len(model_hashes_at(views, min(v.height for v in views))) == 1
