"""Model size: updates of 1M, 10M and 100M float32 parameters through a real 4-node testnet.

First the single-stream throughput of the blob path is measured on this machine (two hosts, one large blob served
in pieces and hashed as it is received) and written to bench/results/stream.json; the bound of every size run is
bytes each node receives / that throughput. Per size: time from the last training finishing until every node
holds every update, peak RSS per node (VmHWM) against 200 MB + 4 x the update's bytes, and whether every
committed block holds all the updates. With --compression the same runs use a compressed update encoding, and
--accuracy trains 20 rounds on digits in-process per encoding (accuracy cost and bytes per update).

    python -m bench.bench_model_size [--sizes 1m,10m] [--compression none,int8] [--accuracy] [--rounds 4]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from flnode.cli.node_cmd import _task_and_rules

from bench.common import print_table, write_json
from bench.harness import run_testnet

# MLP on synthetic data with 1024 features: params = 1024h + h + 10h + 10 = 1035h + 10. Wide inputs keep the hidden
# layer narrow, so a 100M-parameter model's activations stay small (64 features would need h = 1.3M: 340 MB per
# activation of one batch) and the run measures the update path, not one odd network shape.
FEATURES = 1024
SIZES = {"10k": 10, "1m": 966, "10m": 9_662, "100m": 96_618}
RSS_TARGET_MB = {"10m": 360.0, "100m": 1500.0}  # the targets; 1M and below: 200 MB + 4 x model bytes
STREAM_MB = 40


async def _stream_throughput(size_mb: int, repeats: int = 3) -> dict[str, Any]:
    """One large response on one stream between two hosts, the way blobs travel: served in 1 MiB pieces
    (StreamedResponse), received piece by piece into a running sha256 (request_into)."""
    from flnode.node.net import P2PNode, StreamedResponse
    from flnode.protocol.crypto import NodeKey

    blob = os.urandom(size_mb << 20)
    local = ["/ip4/127.0.0.1/tcp/0"]
    times = []
    async with trio.open_nursery() as nursery:
        a = P2PNode(NodeKey.generate().seed, local, topics=["t"])

        async def serve(peer: str, req: bytes) -> StreamedResponse:
            async def pieces() -> Any:
                view = memoryview(blob)
                for at in range(0, len(blob), 1 << 20):
                    yield bytes(view[at : at + (1 << 20)])

            return StreamedResponse(len(blob), pieces, 120)

        a.set_handler("/bench/stream/1", serve)
        await nursery.start(a.run)
        b = P2PNode(NodeKey.generate().seed, local, topics=["t"], bootstrap=[a.listen_addrs()[0]])
        await nursery.start(b.run)
        while not b.connected_peers():
            await trio.sleep(0.05)
        for _ in range(repeats):
            sha = hashlib.sha256()

            async def sink(piece: bytes, sha: Any = sha) -> None:
                sha.update(piece)

            t0 = time.perf_counter()
            n = await b.request_into(a.peer_id, "/bench/stream/1", b"x", sink, max_response=len(blob) + 1, timeout=300)
            times.append(time.perf_counter() - t0)
            assert n == len(blob) and sha.digest() == hashlib.sha256(blob).digest()
        nursery.cancel_scope.cancel()
    best = min(times)
    return {"size_mb": size_mb, "best_s": round(best, 3), "median_s": round(statistics.median(times), 3),
            "mb_per_s": round(size_mb * 1.048576 / best, 1), "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0]}


def measure_stream() -> float:
    row = trio.run(_stream_throughput, STREAM_MB)
    write_json("stream", row)
    print_table("single-stream throughput (MB/s, 1 MB = 10^6 bytes)", [row])
    return float(row["mb_per_s"])


def blocks_full(run: Any, nodes: int, heights: int) -> tuple[bool, list[int]]:
    """Whether every committed block (as node0 stored it) lists every node's update; the counts per height."""
    from flnode.node.chain.store import ChainStore

    s = ChainStore.open(run.views[0].home / "data" / "chain.sqlite", readonly=True)
    try:
        counts = [len(b.updates) if (b := s.get_block(h)) else 0 for h in range(1, heights + 1)]
    finally:
        s.close()
    return all(c == nodes for c in counts), counts


def measure(label: str, nodes: int, rounds: int, mbps: float, compression: str) -> dict[str, Any]:
    from flnode.node.app.compression import blob_size

    hidden = SIZES[label]
    params = (FEATURES + 11) * hidden + 10
    task, rules = _task_and_rules("mlp", "synthetic", "iid", 0.5, "fedavg", 0, 1e12, 1, 0.01, 600_000)
    # a 100M-parameter fit takes ~1 min on the busy machine: the default 60 s training budget would drop updates
    task.update({"hidden": hidden, "synthetic_samples": 400, "batch_size": 64, "synthetic_features": FEATURES,
                 "train_budget_ms": 900_000})
    plain = params * 4 + 4096
    rules.update({"max_blob_bytes": plain + (1 << 20), "timeout_propose_ms": 600_000, "timeout_prevote_ms": 30_000,
                  "timeout_precommit_ms": 30_000, "compression": compression, "compression_topk": 0.01})
    with tempfile.TemporaryDirectory() as d:
        run = run_testnet(Path(d), nodes, rounds, (task, rules), timeout=1800)
        full, counts = blocks_full(run, nodes, min(rounds, min(v.height for v in run.views)))
        g = _genesis_of(run)
    update_bytes = blob_size(g) if g is not None else plain
    update_mb = update_bytes / 1e6
    hold = []
    for h in range(2, rounds + 1):
        ups, trains = run.metric(h, "updates_t"), run.metric(h, "train_s")
        if ups and trains:
            hold.append(max(ups) - max(trains))
    bound = (nodes - 1) * update_mb / mbps
    held = statistics.median(hold) if hold else None
    rss = max(run.peak_rss_mb) if run.peak_rss_mb else None
    model_mb = params * 4 / 1e6
    rss_target = RSS_TARGET_MB.get(label, 200 + 4 * model_mb)
    return {
        "params": params, "compression": compression, "update_mb": round(update_mb, 2), "nodes": nodes,
        "finished": run.finished, "hold_all_s": round(held, 3) if held is not None else None,
        "bound_s": round(bound, 3), "ratio_to_bound": round(held / bound, 2) if held else None,
        "round_s": round(run.median_over_heights("round_time_s") or 0, 3),
        "train_s": round(run.median_over_heights("train_s") or 0, 3),
        "execute_s": round(run.median_over_heights("execute_s") or 0, 3),
        "peak_rss_mb": round(rss, 1) if rss else None, "rss_per_node": [round(x) for x in run.peak_rss_mb],
        "rss_target_mb": round(rss_target, 1), "all_updates_in_every_block": full, "updates_per_block": counts,
    }


def _genesis_of(run: Any) -> Any:
    from flnode.protocol.genesis import Genesis

    try:
        return Genesis.load(run.views[0].home / "genesis.json")
    except Exception:
        return None


def accuracy(modes: list[str], rounds: int = 20) -> list[dict[str, Any]]:
    """20 rounds on digits in-process (4 participants, MLP, FedAvg): final accuracy and bytes per update."""
    from flnode.cli.node_cmd import make_genesis
    from flnode.node.app import (
        compression,
        execute,
        genesis_state,
        load_dataset,
        make_update,
        participant_data,
        task_for,
    )
    from flnode.protocol.crypto import NodeKey

    keys = [NodeKey(bytes([i + 7]) * 32) for i in range(4)]
    rows = []
    for mode in modes:
        task, r = _task_and_rules("mlp", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 2000)
        r.update({"compression": mode, "compression_topk": 0.01})
        g = make_genesis("acc", [(f"n{i}", k.public_key) for i, k in enumerate(keys)], task, r)
        compression.reset()
        state = genesis_state(g)
        data = {k.public_key: participant_data(g.task, 4, g.index_of(k.public_key)) for k in keys}
        _, test = load_dataset(g.task)
        t = task_for(g.task)
        accs, size, loss = [], 0, 0.0
        for _ in range(rounds):
            ups = [make_update(g, k, state, data[k.public_key], g.index_of(k.public_key))[:2] for k in keys]
            size = len(ups[0][1])
            state, receipt = execute(g, state, ups, [])
            assert len(receipt.accepted) == 4
            m = t.evaluate(state.model, test)
            accs.append(m.accuracy)
            loss = float(m.loss)
        rows.append({"compression": mode, "bytes_per_update": size, "accuracy_r5": round(accs[4], 4),
                     "accuracy_r10": round(accs[9], 4), "accuracy_r20": round(accs[-1], 4),
                     "test_loss_r20": round(loss, 4)})
    base = rows[0]["bytes_per_update"] if rows else 1
    for row in rows:
        row["bytes_saved"] = f"{100 * (1 - row['bytes_per_update'] / base):.1f}%"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--sizes", default="1m,10m")
    ap.add_argument("--compression", default="none")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--out", default="model_size")
    ap.add_argument("--quick", action="store_true", help="1M parameters only, 2 rounds (for make bench)")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.rounds, a.out = "1m", 2, "model_size_quick"
    out: dict[str, Any] = {}
    if a.accuracy:
        out["accuracy"] = accuracy(["none", "float16", "int8", "topk"])
        print_table("digits, 4 participants, MLP, FedAvg, 20 rounds (top-k keeps 1%)", out["accuracy"])
    sizes = [s for s in a.sizes.split(",") if s]
    if sizes:
        mbps = measure_stream()
        out["stream_mb_per_s"] = mbps
        out["rows"] = []
        for mode in [m for m in a.compression.split(",") if m]:
            for s in sizes:
                row = measure(s, a.nodes, a.rounds, mbps, mode)
                out["rows"].append(row)
                print_table(f"model size: every node holds every update (stream {mbps:.0f} MB/s)", [row])
    write_json(a.out, out)


if __name__ == "__main__":
    main()
