"""Parity: the same task, partitions, seeds and local training run (a) as a plain in-process centralised FedAvg
loop and (b) through a real flnode testnet. Decentralisation should cost 0.0 accuracy: identical model hashes.

    python -m bench.bench_parity [--quick] [--nodes 4] [--rounds 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from flnode.cli.node_cmd import _task_and_rules
from flnode.node.app import execute, genesis_state, load_dataset, make_update, participant_data, task_for
from flnode.node.chain.store import ChainStore
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis

from bench.common import print_table, write_json
from bench.harness import run_testnet


def centralised(g: Genesis, keys: list[NodeKey], rounds: int) -> list[tuple[float, str]]:
    n = len(g.validators)
    state = genesis_state(g)
    data = {k.public_key: participant_data(g.task, n, g.index_of(k.public_key)) for k in keys}
    _, test = load_dataset(g.task)
    task = task_for(g.task)
    out = []
    for _ in range(rounds):
        ups = [make_update(g, k, state, data[k.public_key], g.index_of(k.public_key))[:2] for k in keys]
        state, _ = execute(g, state, ups, [])
        out.append((task.evaluate(state.model, test).accuracy, state.model_hash.hex()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=0)
    a = ap.parse_args()
    rounds = a.rounds or (8 if a.quick else 20)
    with tempfile.TemporaryDirectory() as d:
        home = Path(d)
        run_testnet(home, a.nodes, rounds, _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0,
                                                                   1, 0.1, 2000))
        g = Genesis.load(home / "node0" / "genesis.json")
        keys = [NodeKey.load(home / f"node{i}" / "node_key.json") for i in range(a.nodes)]
        ref = centralised(g, keys, rounds)
        store = ChainStore.open(home / "node0" / "data" / "chain.sqlite", readonly=True)
        rows = []
        for h in range(1, min(rounds, store.latest_height()) + 1):
            block = store.get_block(h)
            st = store.get_state(h)
            m = store.get_metrics(h) or {}
            rows.append({
                "round": h,
                "updates_in_block": len(block.updates) if block else None,
                "acc_centralised": round(ref[h - 1][0], 4),
                "acc_flnode": round(m.get("test_accuracy", float("nan")), 4),
                "identical_model": st.model_hash.hex() == ref[h - 1][1],
            })
        store.close()
    print_table(f"parity: centralised FedAvg vs a {a.nodes}-node flnode testnet", rows)
    final_same = bool(rows) and rows[-1]["identical_model"]
    summary = {
        "nodes": a.nodes, "rounds": rounds, "all_identical": all(r["identical_model"] for r in rows),
        "final_identical": final_same,
        "final_acc_centralised": rows[-1]["acc_centralised"] if rows else None,
        "final_acc_flnode": rows[-1]["acc_flnode"] if rows else None,
        "accuracy_cost": round(rows[-1]["acc_centralised"] - rows[-1]["acc_flnode"], 6) if rows else None,
    }
    print(summary)
    write_json("parity", {"summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
