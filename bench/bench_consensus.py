"""Consensus alone: simulated node-heights per CPU second over many seeds (target: >= 10,000 at n = 4), and
proposal-to-commit latency of real node processes on loopback with (almost) empty blocks.

    python -m bench.bench_consensus [--quick] [--sim-only]

A node-height is one honest node committing one height; CPU seconds are process time of the whole simulation
(scheduler, fake signatures, block sync and the safety/liveness/certificate checker included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from flnode.cli.demo import NodeView, free_ports, read_node, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet
from flnode.consensus.sim import FAULTS, SimConfig, run_many

from bench.common import RESULTS, print_table, write_json

SKIP = 10  # start-up heights left out of the latency: libp2p starts after the first commit


def simulator(n: int, heights: int, seeds: int, faults: tuple[str, ...], byzantine: int = 0) -> dict[str, object]:
    t0 = time.process_time()
    s = run_many(SimConfig(nodes=n, byzantine=byzantine, heights=heights, faults=faults), range(seeds))
    cpu = time.process_time() - t0
    return {
        "n": n, "byzantine": byzantine, "faults": ",".join(faults) or "none", "seeds": seeds,
        "node_heights": s.node_heights, "cpu_s": round(cpu, 2),
        "node_heights_per_cpu_s": round(s.node_heights / cpu) if cpu > 0 else None,
        "rounds_per_height": round(s.rounds / s.decided_heights, 3) if s.decided_heights else None,
        "max_round": s.max_round, "messages_per_node_height": round(s.messages / max(1, s.node_heights), 1),
        "violations": s.safety_violations + s.liveness_failures + s.certificate_failures,
    }


def loopback(n: int, heights: int) -> dict[str, object]:
    """n validators that do not train: the proposer proposes at once; latency = commit - proposal arrival."""
    with tempfile.TemporaryDirectory() as d:
        home = Path(d)
        task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 0)
        create_testnet(home, n, chain_id="bench-consensus", listen_host="127.0.0.1", ports=free_ports(n),
                       task_rules=(task, rules), force=True)
        os.environ["FLNODE_PARTICIPATE"] = "false"
        try:
            views = [NodeView(f"node{i}", home / f"node{i}") for i in range(n)]
            procs = [start_node(v.home) for v in views]
        finally:
            del os.environ["FLNODE_PARTICIPATE"]
        try:
            deadline = time.monotonic() + 60 + heights * 2
            while time.monotonic() < deadline:
                for v in views:
                    read_node(v)
                if min(v.height for v in views) >= heights + SKIP:
                    break
                time.sleep(0.2)
        finally:
            stop_nodes(procs)
        lat = []
        rounds = []
        for v in views:
            for h in range(SKIP + 1, min(v.height, heights + SKIP) + 1):  # skip start-up heights (libp2p starts)
                m = v.metrics.get(h) or {}
                if "proposal_t" in m and "commit_t" in m:
                    lat.append((m["commit_t"] - m["proposal_t"]) * 1000)
                    rounds.append(m.get("consensus_round", 0))
        lat.sort()
        return {
            "validators": n,
            "heights": min(v.height for v in views),
            "p50_ms": round(statistics.median(lat), 1) if lat else None,
            "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
            "max_round": max(rounds, default=None),
            "target_p50_ms (4 validators)": 20 if n == 4 else "",
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer seeds and heights, smaller loopback runs")
    ap.add_argument("--sim-only", action="store_true", help="skip the real-process loopback latency")
    args = ap.parse_args()
    q = args.quick
    sim_rows = [
        simulator(4, 100, 20 if q else 200, ()),
        simulator(4, 30, 30 if q else 300, FAULTS),
        simulator(4, 30, 30 if q else 300, FAULTS, byzantine=1),
        simulator(7, 30, 10 if q else 100, FAULTS, byzantine=2),
        simulator(10, 20, 5 if q else 50, FAULTS, byzantine=3),
    ]
    if not q:
        sim_rows.append(simulator(100, 5, 2, ()))
    print_table("simulator (target: >= 10,000 node-heights per CPU second at n = 4)", sim_rows)
    lb_rows: list[dict[str, object]] = []
    if args.sim_only:  # keep the last loopback measurement rather than erasing it
        old = RESULTS / "consensus.json"
        if old.exists():
            lb_rows = json.loads(old.read_text()).get("loopback", [])
    else:
        sizes = [4, 8] if q else [4, 8, 16]
        lb_rows = [loopback(n, 10 if q else 30) for n in sizes]
        print_table("proposal-to-commit on loopback, real processes", lb_rows)
    write_json("consensus", {"simulator": sim_rows, "loopback": lb_rows})


if __name__ == "__main__":
    main()
