"""Run a real local testnet for a benchmark: start N node processes, wait for R heights, sample peak RSS."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flnode.cli.demo import NodeView, free_ports, read_node, start_node, stop_nodes
from flnode.cli.node_cmd import create_testnet


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class TestnetRun:
    nodes: int
    heights: int
    wall_s: float
    views: list[NodeView]
    peak_rss_mb: list[float] = field(default_factory=list)
    finished: bool = True

    def metric(self, h: int, key: str) -> list[float]:
        return [float(v.metrics[h][key]) for v in self.views if v.metrics.get(h) and key in v.metrics[h]]

    def median_over_heights(self, key: str, first: int = 2) -> float | None:
        vals = [statistics.median(x) for h in range(first, self.heights + 1) if (x := self.metric(h, key))]
        return statistics.median(vals) if vals else None


def run_testnet(
    home: Path,
    nodes: int,
    heights: int,
    task_rules: tuple[dict[str, Any], dict[str, Any]],
    *,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> TestnetRun:
    create_testnet(home, nodes, chain_id="bench", listen_host="127.0.0.1", ports=free_ports(nodes),
                   task_rules=task_rules, force=True)
    views = [NodeView(f"node{i}", home / f"node{i}") for i in range(nodes)]
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        procs = [start_node(v.home) for v in views]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    peaks = [0.0] * nodes
    t0 = time.monotonic()
    finished = False
    try:
        while time.monotonic() - t0 < timeout:
            for i, p in enumerate(procs):
                r = peak_rss_mb(p.pid)
                if r:
                    peaks[i] = max(peaks[i], r)
            for v in views:
                read_node(v)
            if all(v.height >= heights and v.metrics.get(heights) for v in views):
                finished = True
                break
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
    finally:
        wall = time.monotonic() - t0
        stop_nodes(procs)
    for v in views:
        read_node(v)
        for h in range(1, min(v.height, heights) + 1):
            if not v.metrics.get(h):
                from flnode.node.chain.store import ChainStore

                s = ChainStore.open(v.home / "data" / "chain.sqlite", readonly=True)
                try:
                    v.metrics[h] = s.get_metrics(h) or {}
                finally:
                    s.close()
    return TestnetRun(nodes, heights, wall, views, peaks, finished)
