"""Robustness of each aggregation rule against attacking participants (in-process, no network).

n = 7 participants on digits; 0 .. 2 attackers doing sign flip (-5x their honest update), scaled Gaussian noise,
or label flip (training on y -> 9 - y). Final test accuracy after R rounds vs the no-attack run.

    python -m bench.bench_robustness [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np
from flnode.cli.node_cmd import _task_and_rules, make_genesis
from flnode.node.app import Dataset, execute, genesis_state, load_dataset, participant_data, task_for
from flnode.node.app.participant import sign_update, train_update
from flnode.node.app.tasks import TrainResult
from flnode.protocol.crypto import NodeKey

from bench.common import print_table, write_json

N = 7
KEYS = [NodeKey(bytes([i + 90]) * 32) for i in range(N)]


def run(aggregator: str, attack: str, attackers: int, rounds: int) -> float:
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, aggregator, 0, 1e9, 1, 0.1, 2000)
    rules.update({"krum_byzantine": 2, "trim_fraction": 0.3})
    g = make_genesis("robust", [(f"n{i}", k.public_key) for i, k in enumerate(KEYS)], task, rules)
    state = genesis_state(g)
    order = sorted(KEYS, key=lambda k: k.public_key)
    bad = {k.public_key for k in order[:attackers]}
    data = {k.public_key: participant_data(g.task, N, g.index_of(k.public_key)) for k in KEYS}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        pairs = []
        for k in KEYS:
            d = data[k.public_key]
            idx = g.index_of(k.public_key)
            if k.public_key in bad and attack == "label_flip":
                d = Dataset(d.x, (d.n_classes - 1) - d.y, d.n_classes)
            res = train_update(g, state, d, idx)
            if k.public_key in bad and attack == "sign_flip":
                res = TrainResult({n: -5.0 * v for n, v in res.delta.items()}, res.num_samples, res.loss, res.accuracy)
            if k.public_key in bad and attack == "noise":
                res = TrainResult({n: rng.normal(0, 1.0, v.shape).astype(np.float32) for n, v in res.delta.items()},
                                  res.num_samples, res.loss, res.accuracy)
            pairs.append(sign_update(g, k, state, res))
        state, _ = execute(g, state, pairs, [])
    _, test = load_dataset(g.task)
    return float(task_for(g.task).evaluate(state.model, test).accuracy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rounds = 6 if a.quick else 20
    rows = []
    for agg in ("fedavg", "median", "trimmed_mean", "multi_krum"):
        clean = run(agg, "none", 0, rounds)
        row: dict[str, object] = {"aggregator": agg, "no_attack": round(clean, 3)}
        for attack in ("sign_flip", "noise", "label_flip"):
            for f in (1, 2):
                row[f"{attack} f={f}"] = round(run(agg, attack, f, rounds), 3)
        rows.append(row)
    print_table(f"final test accuracy after {rounds} rounds, n = {N}, by attack and number of attackers", rows)
    write_json("robustness", {"rounds": rounds, "n": N, "rows": rows})


if __name__ == "__main__":
    main()
