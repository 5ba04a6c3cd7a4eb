"""The node's status: one snapshot for the status file and the web view, and the loop-lag probe.

Everything here reads attributes on the event loop (no I/O) except `StatusFile.write`, a small atomic rename.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import trio
from flnode.node.metrics import Metrics

STATUS_EVERY_S = 2.0
LAG_PROBE_S = 0.05  # not shorter: each expiring sleep costs ~0.1 ms of CPU, which 16 processes on 2 cores feel
STALL_S = 0.25


class NodeView(Protocol):
    """What the status snapshot and the web view read from a running node."""

    genesis: Any
    store: Any
    net: Any
    transport: Any
    machine: Any
    metrics: Metrics
    config: Any

    @property
    def is_validator(self) -> bool: ...

    @property
    def state(self) -> Any: ...

    @property
    def validator_peers(self) -> dict[str, bytes]: ...

    @property
    def halted(self) -> str | None: ...


def live_snapshot(node: NodeView) -> dict[str, Any]:
    """Where the node is now: its tip, consensus position, peers and whether it halted."""
    connected = node.transport.connected()
    online = sum(1 for p in node.validator_peers if p in connected) + (1 if node.is_validator else 0)
    return {
        "moniker": node.config.moniker,
        "peer_id": node.net.peer_id,
        "height": node.state.height,
        "model_hash": node.state.model_hash.hex(),
        "consensus_height": getattr(node.machine, "height", None),
        "consensus_round": getattr(node.machine, "round", None),
        "peers": len(node.net.connected_peers()),
        "validators": len(node.validator_peers),
        "validators_online": online,
        "halted": node.halted,
    }


def status_record(node: NodeView) -> dict[str, Any]:
    """The live snapshot plus the process, its addresses and every counter: what `flnode status` reads."""
    counters = node.transport.counters
    return {
        **live_snapshot(node),
        "pid": os.getpid(),
        "time": time.time(),
        "chain_id": node.genesis.chain_id,
        "addrs": node.net.listen_addrs(),
        "counters": dict(node.metrics.counters),
        "gauges": dict(node.metrics.gauges),
        "net": {**node.net.counters, **{f"consensus_{k}": v for k, v in counters.items()},
                "consensus_frames_in": counters.get("received", 0),
                "consensus_frames_out": counters.get("sent", 0)},
    }


class StatusFile:
    """data/status.json, replaced atomically so a reader never sees half a record."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)


async def write_every(write: Callable[[], None], period: float = STATUS_EVERY_S) -> None:
    while True:
        write()
        await trio.sleep(period)


async def probe_loop_lag(metrics: Metrics, clock: Callable[[], float] = trio.current_time) -> None:
    """How late a short sleep wakes up: how long something held the event loop (a blocking call would show)."""
    worst = 0.0
    while True:
        t0 = clock()
        await trio.sleep(LAG_PROBE_S)
        lag = clock() - t0 - LAG_PROBE_S
        if lag > worst:
            worst = lag
            metrics.set("loop_lag_max_ms", round(worst * 1000, 1))
        if lag > STALL_S:
            metrics.inc("loop_stalls")


def publish_status(node: NodeView, worker: Any, status_file: StatusFile | None) -> None:
    """The gauges read from other services' fields, then the status file (if the node keeps one)."""
    if status_file is None:
        return
    node.metrics.set("store_max_call_ms", round(worker.max_call_s * 1000, 2))
    node.metrics.set("sign_refusals", getattr(node.machine, "sign_refusals", 0))
    for reason, n in getattr(node.machine, "dropped", {}).items():  # remote messages that could not count
        node.metrics.set(f"consensus_dropped_{reason}", n)
    status_file.write(status_record(node))
