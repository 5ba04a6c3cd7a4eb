"""Accuracy against epsilon under differential privacy, in-process through the pure app (no network).

Digits, logreg and MLP, 4 and 10 participants (IID shards), 20 rounds, delta = 1e-5. For each target epsilon in
{1, 2, 4, 8} the noise multiplier z is calibrated (bisection on dp-accounting's RDP accountant, through the same
node/app/privacy.py the chain uses) so that a participant that takes part in all 20 rounds spends exactly that
epsilon; inf is the same network without DP (the genesis defaults: lr 0.1, batch 32, one epoch per round), and
"inf, same optimiser" is record level's optimiser (Poisson batches, lr 1.0) with neither clipping nor noise.

- record level: DP-SGD in every participant's local training, Poisson sampling q = 0.1 (10 steps per round),
  per-example clip C = 1, learning rate 1.0 (chosen once on a small grid at epsilon = 8, logreg, 4 participants;
  that choice is not accounted for). Epsilon protects one record of one participant's data.
- participant level: plain local training, each update clipped to C = 0.5 and noised with z * C / sqrt(m); the
  FedAvg aggregate of the m updates carries z * C / m on the mean. Epsilon protects a participant's whole data set
  against whoever sees only the models (not the individual updates: see docs/PRIVACY.md).

Also measured: local training time per participant-round, DP-SGD against plain SGD.

    python -m bench.bench_privacy [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

from flnode.cli.node_cmd import _task_and_rules, make_genesis
from flnode.node.app import dp as dp_mod
from flnode.node.app import execute, genesis_state, load_dataset, participant_data, privacy, task_for
from flnode.node.app.participant import sign_update, train_update
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis

from bench.common import print_table, write_json

KEYS = [NodeKey(bytes([i + 120]) * 32) for i in range(10)]
DELTA = 1e-5
EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)
REPS = 3  # DP runs per cell (different noise draws); the table shows the mean accuracy
RECORD: dict[str, Any] = {"dp_mode": "record", "dp_sample_rate": 0.1, "dp_clip": 1.0}
RECORD_LR = 1.0
PARTICIPANT: dict[str, Any] = {"dp_mode": "participant", "dp_clip": 0.5}


def make(n: int, model: str, lr: float = 0.1, rep: int = 0, **rules: Any) -> Genesis:
    """The genesis; `rep` changes only the chain id, hence every node's secret DP noise seed."""
    task, r = _task_and_rules(model, "digits", "iid", 0.5, "fedavg", 0, 1e9, 1, lr, 2000)
    r.update(rules, dp_delta=DELTA)
    return make_genesis(f"bench-privacy-{rep}", [(f"n{i}", k.public_key) for i, k in enumerate(KEYS[:n])], task, r)


def calibrate(n: int, model: str, lr: float, eps: float, rounds: int, dp: dict[str, Any]) -> float:
    """The smallest noise multiplier (to 1e-4 relative) whose epsilon after `rounds` rounds is at most `eps`."""
    lo, hi = 0.2, 500.0
    while hi / lo > 1 + 1e-4:
        z = math.sqrt(lo * hi)
        g = make(n, model, lr, dp_noise=z, **dp)
        if privacy.epsilon(g, KEYS[0].public_key, rounds) > eps:
            lo = z
        else:
            hi = z
    return hi


def run(g: Genesis, rounds: int) -> tuple[float, float]:
    """Final test accuracy, and the median local training time of one participant-round (s)."""
    n = len(g.validators)
    keys = KEYS[:n]
    state = genesis_state(g)
    data = {k.public_key: participant_data(g.task, n, g.index_of(k.public_key)) for k in keys}
    times = []
    for _ in range(rounds):
        pairs = []
        for k in keys:
            t0 = time.perf_counter()
            noise = dp_mod.noise_seed(k.seed, g.chain_id, state.height + 1)  # what make_update uses
            res = train_update(g, state, data[k.public_key], g.index_of(k.public_key), noise)
            times.append(time.perf_counter() - t0)
            pairs.append(sign_update(g, k, state, res))
        state, receipt = execute(g, state, pairs, [])
        assert len(receipt.accepted) == n, receipt.rejected
    _, test = load_dataset(g.task)
    return float(task_for(g.task).evaluate(state.model, test).accuracy), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="logreg, 4 participants, epsilon 8 and inf only")
    a = ap.parse_args()
    rounds = 20
    models = ("logreg",) if a.quick else ("logreg", "mlp")
    sizes = (4,) if a.quick else (4, 10)
    epsilons = (8.0, math.inf) if a.quick else EPSILONS
    rows: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    for model in models:
        for n in sizes:
            plain_acc, plain_t = run(make(n, model), rounds)
            for mode, dp, lr in (("record", RECORD, RECORD_LR), ("participant", PARTICIPANT, 0.1)):
                row: dict[str, Any] = {"model": model, "participants": n, "mode": mode}
                for eps in epsilons:
                    if math.isinf(eps):
                        row["eps=inf"] = round(plain_acc, 3)
                        if mode == "record":  # the same optimiser (sampling, lr) without clipping or noise
                            same = make(n, model, lr, **{**dp, "dp_clip": 1e9, "dp_noise": 1e-9})
                            row["inf, same optimiser"] = round(run(same, rounds)[0], 3)
                        continue
                    z = calibrate(n, model, lr, eps, rounds, dp)
                    runs = [run(make(n, model, lr, rep, dp_noise=z, **dp), rounds) for rep in range(REPS)]
                    acc, t = statistics.mean(a for a, _ in runs), statistics.median(t for _, t in runs)
                    row[f"eps={eps:g}"] = round(acc, 3)
                    row[f"z@{eps:g}"] = round(z, 3)
                    if mode == "record" and eps == 8.0:
                        timing.append({"model": model, "participants": n, "plain_s": round(plain_t, 5),
                                       "dp_sgd_s": round(t, 5), "ratio": round(t / plain_t, 2)})
                print(row, flush=True)
                rows.append(row)
    cols = ["model", "participants", "mode", *[f"eps={e:g}" for e in epsilons], "inf, same optimiser"]
    print_table(f"test accuracy after {rounds} rounds, digits, delta = {DELTA:g} (mean of {REPS} noise draws; inf: no DP)",
                [{c: r.get(c) for c in cols} for r in rows])
    print_table("noise multiplier z per target epsilon",
                [{k: v for k, v in r.items() if k not in cols[3:]} for r in rows])
    print_table("local training per participant-round (median s): DP-SGD (record, eps = 8) vs plain SGD", timing)
    write_json("privacy", {"rounds": rounds, "delta": DELTA, "noise_draws": REPS, "record": {**RECORD, "learning_rate": RECORD_LR},
                           "participant": PARTICIPANT, "rows": rows, "timing": timing})


if __name__ == "__main__":
    main()
