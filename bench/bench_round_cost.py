"""Round cost on the demo task: wall time per round for N node processes, split into local training,
update dissemination, consensus (proposal to commit) and execution, with peak RSS per node.

    python -m bench.bench_round_cost [--quick] [--nodes 4,8,16] [--rounds 12]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from flnode.cli.node_cmd import _task_and_rules

from bench.common import print_table, write_json
from bench.harness import run_testnet

TARGETS = {4: 0.3, 8: 0.5}


def measure(n: int, rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        run = run_testnet(Path(d), n, rounds, _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1,
                                                               0.1, 2000))
    med = run.median_over_heights
    round_s, train = med("round_time_s"), med("train_s")
    updates, proposal, commit, execute = med("updates_t"), med("proposal_t"), med("commit_t"), med("execute_s")
    target = TARGETS.get(n)
    return {
        "nodes": n,
        "rounds": rounds,
        "finished": run.finished,
        "median_round_s": round(round_s, 3) if round_s else None,
        "target_s": target,
        "met": (round_s is not None and round_s <= target) if target else "",
        "train_s": round(train, 4) if train else None,
        "dissemination_s": round(updates - train, 3) if updates and train else None,
        "consensus_s": round(commit - proposal, 3) if commit and proposal else None,
        "execute_s": round(execute, 4) if execute else None,
        "overhead_x": round(round_s / train, 1) if round_s and train else None,
        "peak_rss_mb": round(max(run.peak_rss_mb), 1) if run.peak_rss_mb else None,
        "rss_target_mb": 200,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nodes", default="")
    ap.add_argument("--rounds", type=int, default=0)
    a = ap.parse_args()
    sizes = [int(x) for x in a.nodes.split(",") if x] or ([4, 8] if a.quick else [4, 8, 16])
    rounds = a.rounds or (8 if a.quick else 15)
    rows = [measure(n, rounds) for n in sizes]
    print_table("round cost on the demo task (digits, logreg, FedAvg)", rows)
    write_json("round_cost", {"rows": rows})


if __name__ == "__main__":
    main()
