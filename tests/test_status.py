"""The status service: one snapshot for the status file and the web view, and the loop-lag probe."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
from flnode.node.metrics import Metrics
from flnode.node.status import StatusFile, live_snapshot, probe_loop_lag, status_record


def fake_node(*, halted: str | None = None, validator: bool = True) -> Any:
    transport = SimpleNamespace(connected=lambda: {"p1", "p3"}, counters={"received": 7, "sent": 5, "refused": 1})
    net = SimpleNamespace(peer_id="12D3me", connected_peers=lambda: ["p1", "p2", "p3"],
                          listen_addrs=lambda: ["/ip4/127.0.0.1/tcp/1"], counters={"gossip_in": 3})
    metrics = Metrics()
    metrics.inc("rejected_bad_signature", 2)
    return SimpleNamespace(
        genesis=SimpleNamespace(chain_id="chain-x"), store=None, state=SimpleNamespace(height=12, model_hash=b"\x01" * 32), net=net,
        transport=transport, machine=SimpleNamespace(height=13, round=1), metrics=metrics,
        validator_peers={"p1": b"a", "p2": b"b", "p3": b"c"}, is_validator=validator, halted=halted,
        config=SimpleNamespace(moniker="node0"),
    )


def test_live_snapshot_counts_online_validators_and_itself() -> None:
    snap = live_snapshot(fake_node())
    assert snap["height"] == 12 and snap["consensus_height"] == 13 and snap["consensus_round"] == 1
    assert snap["validators"] == 3 and snap["validators_online"] == 3  # p1, p3 and this validator
    assert snap["peers"] == 3 and snap["model_hash"] == "01" * 32 and snap["halted"] is None
    assert live_snapshot(fake_node(validator=False))["validators_online"] == 2


def test_status_file_holds_the_live_snapshot_and_every_counter(tmp_path: Path) -> None:
    node = fake_node(halted="app hash mismatch at 12")
    out = StatusFile(tmp_path / "status.json")
    out.write(status_record(node))
    got = json.loads((tmp_path / "status.json").read_text())
    assert {k: got[k] for k in live_snapshot(node)} == live_snapshot(node)  # the web view and the file agree
    assert got["chain_id"] == "chain-x" and got["halted"] == "app hash mismatch at 12"
    assert got["counters"] == {"rejected_bad_signature": 2}
    assert got["net"]["consensus_frames_in"] == 7 and got["net"]["consensus_refused"] == 1
    assert not (tmp_path / "status.tmp").exists()  # written beside, then renamed over


async def test_loop_lag_probe_sees_a_blocking_call() -> None:
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe_loop_lag, metrics)
        await trio.sleep(0.12)
        time.sleep(0.4)  # holds the loop the way a blocking call on it would
        await trio.sleep(0.12)
        nursery.cancel_scope.cancel()
    assert metrics.counters["loop_stalls"] >= 1
    assert metrics.gauges["loop_lag_max_ms"] >= 250
