"""Rules with history (bucketing, nearest-neighbour mixing, centered clipping around the last step, reputation
weighting) against slow whole-array references; input order never matters; the state carries the previous
model, its hash enters the app hash, the store reloads it and `chain verify` replays the chain."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import examples
from flnode.node.app import aggregate, genesis_state
from flnode.node.app.aggregation import WeightedUpdate, bucket_order
from flnode.node.app.state import decode_state, encode_state
from flnode.node.app.validation import fixed_order_sum_squares
from flnode.protocol.genesis import Rules
from flnode.protocol.hashing import digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BASE = {"w": np.zeros((5, 3), np.float32)}


def updates(seed: int, n: int) -> list[WeightedUpdate]:
    rng = np.random.default_rng(seed)
    return [WeightedUpdate(digest(b"h%d-%d" % (seed, i)), bytes([i]) * 32,
                           {"w": rng.normal(size=(5, 3)).astype(np.float32)}, int(rng.integers(1, 100)))
            for i in range(n)]


def flat(u: WeightedUpdate) -> np.ndarray:
    return u.delta["w"].astype(np.float64).reshape(-1)  # type: ignore[union-attr]


def weighted_mean(xs: list[np.ndarray], ws: list[float]) -> np.ndarray:
    tot = math.fsum(ws)
    acc = np.zeros_like(xs[0])
    for x, w in zip(xs, ws, strict=True):
        acc += (w / tot) * x
    return acc


def median(xs: list[np.ndarray]) -> np.ndarray:
    s = np.sort(np.stack(xs), axis=0, kind="stable")
    n = len(xs)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * 0.5


def cc(xs: list[np.ndarray], v: np.ndarray) -> np.ndarray:
    n = len(xs)
    d = [math.sqrt(fixed_order_sum_squares(x - v)) for x in xs]
    tau = sorted(d)[(n - 1) // 2]
    for it in range(3):
        if it:
            d = [math.sqrt(fixed_order_sum_squares(x - v)) for x in xs]
        acc = np.zeros_like(v)
        for x, di in zip(xs, d, strict=True):
            acc += (1.0 if di <= tau else tau / di) * (x - v)
        v = v + acc / n
    return v


def as_model(v: np.ndarray) -> np.ndarray:
    return (0.0 + v).astype(np.float32).reshape(5, 3)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), size=st.integers(1, 4))
@settings(max_examples=examples(40), deadline=None, suppress_health_check=list(HealthCheck))
def test_bucketing_then_median_matches_the_reference(seed: int, n: int, size: int) -> None:
    ups = updates(seed, n)
    s = b"seed%d" % seed
    perm = sorted(ups, key=lambda u: (digest(s + u.key), u.key))
    buckets = [sorted(perm[i:i + size], key=lambda u: u.key) for i in range(0, n, size)]
    means = [weighted_mean([flat(u) for u in b], [float(u.num_samples) for u in b]) for b in buckets]
    got = aggregate(BASE, ups, Rules(aggregator="median", mixing="bucketing", bucket_size=size,
                                     weight_median_multiple=0), seed=s).new_model["w"]
    assert np.array_equal(got, as_model(median(means)))
    assert [u.key for u in bucket_order(list(reversed(ups)), s)] == [u.key for u in perm]


@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), f=st.integers(0, 3))
@settings(max_examples=examples(40), deadline=None, suppress_health_check=list(HealthCheck))
def test_nearest_neighbour_mixing_then_centered_clip_matches_the_reference(seed: int, n: int, f: int) -> None:
    ups = sorted(updates(seed, n), key=lambda u: u.key)
    xs = [flat(u) for u in ups]
    k = max(1, n - f)
    mixed = []
    for i in range(n):
        d = [(0 if j == i else 1, fixed_order_sum_squares(xs[i] - xs[j]), ups[j].key, j) for j in range(n)]
        near = sorted(t[3] for t in sorted(d)[:k])
        mixed.append(weighted_mean([xs[j] for j in near], [1.0] * len(near)))
    got = aggregate(BASE, list(reversed(ups)), Rules(aggregator="centered_clip", mixing="nnm",
                                                     krum_byzantine=f)).new_model["w"]
    assert np.array_equal(got, as_model(cc(mixed, median(mixed))))


def test_centered_clip_momentum_starts_from_the_last_step() -> None:
    ups = updates(3, 7)
    prev = {"w": np.full((5, 3), -0.25, np.float32)}  # the model before BASE: the last step was +0.25 everywhere
    got = aggregate(BASE, ups, Rules(aggregator="centered_clip_momentum"), previous=prev).new_model["w"]
    xs = [flat(u) for u in sorted(ups, key=lambda u: u.key)]
    assert np.array_equal(got, as_model(cc(xs, np.full(15, 0.25))))
    first = aggregate(BASE, ups, Rules(aggregator="centered_clip_momentum")).new_model["w"]
    assert np.array_equal(first, aggregate(BASE, ups, Rules(aggregator="centered_clip")).new_model["w"])


def test_colluding_updates_are_held_near_the_honest_ones() -> None:
    """Four identical large updates against six honest ones: NNM then centered clipping stays in the honest
    spread where FedAvg is taken over."""
    ups = updates(5, 10)
    ups = [replace(u, delta={"w": np.full((5, 3), -40.0, np.float32)}) if i < 4 else u for i, u in enumerate(ups)]
    robust = aggregate(BASE, ups, Rules(aggregator="centered_clip", mixing="nnm", krum_byzantine=4)).new_model["w"]
    plain = aggregate(BASE, ups, Rules(aggregator="fedavg")).new_model["w"]
    assert np.abs(robust).max() < 4 and plain.min() < -10


def test_reputation_weights_fedavg_and_zero_reputation_counts_nothing() -> None:
    ups = updates(7, 3)
    rep = {ups[0].author: 0, ups[1].author: 100, ups[2].author: 300}
    rules = Rules(aggregator="fedavg", reputation_weighted=True, weight_median_multiple=0)
    got = aggregate(BASE, ups, rules, reputation=rep).new_model["w"]
    byk = sorted(ups, key=lambda u: u.key)
    want = weighted_mean([flat(u) for u in byk], [float(u.num_samples * rep[u.author]) for u in byk])
    assert np.array_equal(got, as_model(want))


def test_the_state_carries_the_previous_model_and_the_store_reloads_it(tmp_path: Path) -> None:
    from flnode.cli.node_cmd import _task_and_rules, make_genesis
    from flnode.node.app import execute, make_update, participant_data
    from flnode.node.chain.store import ChainStore
    from flnode.node.chain.verify import verify_chain
    from test_chain import KEYS, certify, genesis_block_hash

    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "centered_clip_momentum", 0, 100.0, 1, 0.1, 2000)
    rules.update(mixing="nnm", krum_byzantine=1)
    g = make_genesis("momentum", [(f"n{i}", k.public_key) for i, k in enumerate(KEYS)], task, rules)
    from flnode.node.app.blocks import build_block

    state, prev, last = genesis_state(g), genesis_block_hash(g), None
    store = ChainStore.open(tmp_path / "c.sqlite", genesis_hash=g.hash())
    data = {k.public_key: participant_data(g.task, 4, g.index_of(k.public_key)) for k in KEYS}
    models = [state.model_hash]
    for h in range(1, 4):
        cands = []
        for k in KEYS:
            ann, blob, _ = make_update(g, k, state, data[k.public_key], g.index_of(k.public_key))
            store.blobs.put(ann.blob_hash, blob)
            cands.append((ann, blob))
        block, new, receipt = build_block(g, state, prev_block_hash=prev, last_commit=last,
                                          proposer=KEYS[h % 4].public_key, time_ms=h, candidates=cands)
        assert new.prev_model_hash == state.model_hash and new.hash() != replace(new, prev_model_hash=None).hash()
        cert = certify(g, block, KEYS[:3])
        store.commit_height(block, cert, new, receipt, new.model)
        state, prev, last = new, block.hash(), cert
        models.append(state.model_hash)
    again = store.get_state(3)
    assert again.hash() == state.hash() and again.prev_model_hash == models[2]
    assert all(np.array_equal(again.prev_model[k], state.prev_model[k]) for k in state.model)
    assert decode_state(encode_state(state), state.model, prev_model=state.prev_model).hash() == state.hash()
    with pytest.raises(Exception, match="previous model"):
        decode_state(encode_state(state), state.model, prev_model=again.model)
    # a restarted node continues from the stored state exactly as the running one would
    cands = [make_update(g, k, state, data[k.public_key], g.index_of(k.public_key))[:2] for k in KEYS]
    assert execute(g, again, cands)[0].hash() == execute(g, state, cands)[0].hash()
    report = verify_chain(store, g)
    assert report.ok and report.heights == 3, report.reason
    # pruning below height 2 drops height 1's updates, keeps the later models and the previous model (of 1)
    # the state at height 2 points back at, so the state at the cut-off still loads
    first_updates = [u.blob_hash for u in store.get_block(1).updates]
    removed: list[bytes] = []
    store.prune_blobs(3, 1, removed)
    assert sorted(removed) == sorted([*first_updates, models[0]])
    assert all(store.blobs.has(m) for m in models[1:])
    assert store.get_state(2).prev_model_hash == models[1] and store.get_state(2).hash()
    store.close()


# ---------------------------------------------------------------- hand-computed examples, invariances, hull

def scalar_updates(values: list[float], samples: list[int] | None = None) -> list[WeightedUpdate]:
    return [WeightedUpdate(digest(b"s%d" % i), bytes([i + 1]) * 32, {"w": np.array([v], np.float32)},
                           (samples or [1] * len(values))[i]) for i, v in enumerate(values)]


ONE = {"w": np.zeros(1, np.float32)}


def test_nnm_by_hand() -> None:
    """0, 1, 2, 10 with f = 1: the neighbourhoods of 0, 1 and 2 are {0, 1, 2} (mean 1), that of 10 is
    {10, 2, 1} (mean 13/3); the median of 1, 1, 1, 13/3 is 1, their mean (equal samples) is 11/6."""
    ups = scalar_updates([0.0, 1.0, 2.0, 10.0])
    med = aggregate(ONE, ups, Rules(aggregator="median", mixing="nnm", krum_byzantine=1)).new_model["w"]
    avg = aggregate(ONE, ups, Rules(aggregator="fedavg", mixing="nnm", krum_byzantine=1)).new_model["w"]
    assert med[0] == np.float32(1.0) and avg[0] == np.float32(11 / 6)


def test_bucketing_by_hand() -> None:
    """One bucket holding everything is the sample-weighted mean (0 x 1 and 4 x 3: 3); buckets of two of
    0, 2, 4, 100 under the median: the mean of the two bucket means, whatever the permutation; buckets of one are
    the inner rule itself."""
    two = scalar_updates([0.0, 4.0], [1, 3])
    got = aggregate(ONE, two, Rules(aggregator="median", mixing="bucketing", bucket_size=2, weight_median_multiple=0),
                    seed=b"x").new_model["w"]
    assert got[0] == np.float32(3.0)
    four = scalar_updates([0.0, 2.0, 4.0, 100.0])
    from flnode.node.app.aggregation import Bucketing, Median, combine
    b = Bucketing(Median(), 2, b"seed")
    pairs = b.buckets(four)
    assert sorted(len(p) for p in pairs) == [2, 2] and sorted(u.key for p in pairs for u in p) == sorted(u.key for u in four)
    means = sorted(sum(float(u.delta["w"][0]) for u in p) / 2 for p in pairs)  # type: ignore[index]
    assert combine(b, four, Rules())[0]["w"][0] == (means[0] + means[1]) * 0.5
    for rule in ("median", "trimmed_mean", "multi_krum", "centered_clip"):
        ups = updates(11, 7)
        single = aggregate(BASE, ups, Rules(aggregator=rule, mixing="bucketing", bucket_size=1), seed=b"s")
        assert np.array_equal(single.new_model["w"], aggregate(BASE, ups, Rules(aggregator=rule)).new_model["w"])


def test_centered_clip_around_a_reference_by_hand() -> None:
    """Reference 0, updates 1, 1, 10, tau 2, one iteration: 0 + (1 + 1 + 10 x 2/10) / 3 = 4/3."""
    from flnode.node.app.aggregation import CenteredClipMomentum, combine

    def zero(name: str, a: int, b: int) -> np.ndarray:
        return np.zeros(b - a)

    got, out = combine(CenteredClipMomentum(zero, tau=2.0, iterations=1), scalar_updates([1.0, 1.0, 10.0]), Rules())
    assert got["w"][0] == 4 / 3 and not out


def test_zero_weights_do_not_crash_multi_krum() -> None:
    """Reputation 0 (reachable with exclude_below <= 0) on every update Multi-Krum keeps: the plain mean."""
    rng = np.random.default_rng(0)
    ups = [WeightedUpdate(digest(bytes([i])), bytes([i]) * 32,
                          {"w": (rng.normal(size=4) + (50 if i < 2 else 0)).astype(np.float32)}, 10) for i in range(7)]
    rep = {u.author: (100 if i < 2 else 0) for i, u in enumerate(ups)}
    rules = Rules(aggregator="multi_krum", krum_byzantine=2, reputation_weighted=True)
    res = aggregate({"w": np.zeros(4, np.float32)}, ups, rules, reputation=rep)
    assert np.isfinite(res.new_model["w"]).all() and np.abs(res.new_model["w"]).max() < 5


COMPOSED = [
    ("median", "bucketing"), ("trimmed_mean", "bucketing"), ("multi_krum", "bucketing"),
    ("centered_clip", "bucketing"), ("centered_clip_momentum", "bucketing"), ("fedavg", "bucketing"),
    ("median", "nnm"), ("trimmed_mean", "nnm"), ("multi_krum", "nnm"), ("centered_clip", "nnm"),
    ("centered_clip_momentum", "nnm"), ("fedavg", "nnm"), ("centered_clip_momentum", "none"),
]


def _rules(agg: str, mixing: str) -> Rules:
    return Rules(aggregator=agg, mixing=mixing, bucket_size=2, krum_byzantine=1, reputation_weighted=True)


@pytest.mark.parametrize(("agg", "mixing"), COMPOSED)
def test_input_order_never_matters_and_two_runs_agree(agg: str, mixing: str) -> None:
    ups = updates(4, 7)
    rep = {u.author: 60 + 7 * i for i, u in enumerate(ups)}
    prev = {"w": np.full((5, 3), 0.1, np.float32)}
    rng = np.random.default_rng(1)
    results = set()
    for _ in range(6):
        order = [ups[i] for i in rng.permutation(len(ups))]
        r = aggregate(BASE, order, _rules(agg, mixing), seed=b"block", reputation=rep, previous=prev)
        results.add((digest(r.new_model["w"].tobytes()), r.outliers))
    assert len(results) == 1


BITS_SCRIPT = """
import numpy as np
from flnode.node.app.aggregation import WeightedUpdate, aggregate
from flnode.protocol.genesis import Rules
from flnode.protocol.hashing import digest
rng = np.random.default_rng(9)
ups = [WeightedUpdate(digest(bytes([i])), bytes([i]) * 32, {"w": rng.normal(size=(300, 200)).astype(np.float32)}, 10 + i)
       for i in range(7)]
prev = {"w": rng.normal(size=(300, 200)).astype(np.float32)}
out = []
for agg, mixing in COMPOSED:
    r = Rules(aggregator=agg, mixing=mixing, bucket_size=2, krum_byzantine=1, reputation_weighted=True)
    m = aggregate({"w": np.zeros((300, 200), np.float32)}, ups, r, seed=b"s", reputation={u.author: 50 + i for i, u in
                  enumerate(ups)}, previous=prev).new_model
    out.append(digest(m["w"].tobytes()).hex())
print(",".join(out))
"""


def test_same_bits_across_processes_and_thread_settings() -> None:
    import os
    import subprocess
    import sys

    results = set()
    for threads in ("1", "4"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        out = subprocess.run([sys.executable, "-c", f"COMPOSED = {COMPOSED!r}\n{BITS_SCRIPT}"], env=env, capture_output=True, text=True, check=True)
        results.add(out.stdout.strip())
    assert len(results) == 1 and len(next(iter(results)).split(",")) == len(COMPOSED)


MEDIAN_LIKE = [("median", "none"), ("trimmed_mean", "none"), ("median", "bucketing"), ("trimmed_mean", "bucketing"),
               ("median", "nnm"), ("trimmed_mean", "nnm"), ("multi_krum", "nnm"), ("fedavg", "bucketing")]


@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), size=st.integers(1, 4), f=st.integers(0, 3),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e6, 1e30]), rule=st.sampled_from(COMPOSED + MEDIAN_LIKE))
@settings(max_examples=examples(80), deadline=None, suppress_health_check=list(HealthCheck))
def test_outputs_are_finite_and_median_like_rules_stay_in_the_hull(seed: int, n: int, size: int, f: int,
                                                                   scale: float, rule: tuple[str, str]) -> None:
    agg, mixing = rule
    ups = [replace(u, delta={"w": (u.delta["w"] * scale).astype(np.float32)}) for u in updates(seed, n)]  # type: ignore[index]
    rules = Rules(aggregator=agg, mixing=mixing, bucket_size=size, krum_byzantine=f, weight_median_multiple=0)
    prev = {"w": (np.full((5, 3), -0.5) * scale).astype(np.float32)}
    d = aggregate(BASE, ups, rules, seed=b"%d" % seed, previous=prev).new_model["w"].astype(np.float64)
    assert np.isfinite(d).all()
    if rule in MEDIAN_LIKE:  # every mixed update is a convex combination, every output an order statistic or mean
        xs = np.stack([u.delta["w"].astype(np.float64) for u in ups])  # type: ignore[union-attr]
        lo, hi = xs.min(axis=0), xs.max(axis=0)
        slack = 1e-6 * np.maximum(np.abs(lo), np.abs(hi))  # float32 rounding of the model and of weighted means
        assert (d >= lo - slack).all() and (d <= hi + slack).all()


def test_a_genesis_without_the_new_rules_keeps_its_hash() -> None:
    import json

    from flnode.protocol.genesis import LATER_RULES, Genesis

    g = Genesis.from_json_dict(json.loads(json.dumps(_genesis_dict())))
    body = json.loads(g.canonical_bytes())
    assert not {"mixing", "bucket_size", "reputation_weighted"} & set(body["rules"])
    assert {"mixing", "bucket_size", "reputation_weighted"} <= set(LATER_RULES)
    raw = _genesis_dict()
    raw["rules"].update(mixing="none", bucket_size=2, reputation_weighted=False)  # the defaults, spelt out
    assert Genesis.from_json_dict(raw).hash() == g.hash()
    raw["rules"].update(mixing="bucketing")
    assert Genesis.from_json_dict(raw).hash() != g.hash()
    raw["rules"].update(mixing="none", reputation_weighted="yes")
    with pytest.raises(Exception, match="reputation_weighted"):
        Genesis.from_json_dict(raw)


def _genesis_dict() -> dict:  # type: ignore[type-arg]
    return {"chain_id": "c", "genesis_time": "t", "validators": [{"name": "a", "public_key": "11" * 32, "power": 1}],
            "task": {}, "initial_model_hash": "00" * 32, "rules": {"aggregator": "centered_clip"}}
