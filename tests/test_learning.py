"""node/app: real training on the digits set, validation reason codes, deterministic aggregation, rewards."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from conftest import examples
from flnode.cli.node_cmd import _task_and_rules, make_genesis
from flnode.node.app import (
    Reason,
    WeightedUpdate,
    aggregate,
    execute,
    genesis_state,
    load_dataset,
    make_update,
    participant_data,
    partition,
    task_for,
)
from flnode.protocol.crypto import NodeKey
from flnode.protocol.errors import GenesisError, ValidationError
from flnode.protocol.genesis import Genesis, Rules
from flnode.protocol.hashing import digest
from flnode.protocol.messages import UpdateAnnouncement
from flnode.protocol.tensors import encode_tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEYS = [NodeKey(bytes([i + 7]) * 32) for i in range(7)]


def genesis(n: int = 4, aggregator: str = "fedavg", model: str = "logreg", part: str = "iid", **rules: object) -> Genesis:
    task, r = _task_and_rules(model, "digits", part, 0.5, aggregator, 0, 100.0, 1, 0.1, 2000)
    r.update(rules)
    return make_genesis("learn", [(f"n{i}", k.public_key) for i, k in enumerate(KEYS[:n])], task, r)


def train_rounds(g: Genesis, rounds: int) -> list[float]:
    n = len(g.validators)
    state = genesis_state(g)
    keys = KEYS[:n]
    data = {k.public_key: participant_data(g.task, n, g.index_of(k.public_key)) for k in keys}
    _, test = load_dataset(g.task)
    task = task_for(g.task)
    acc = []
    for _ in range(rounds):
        ups = [make_update(g, k, state, data[k.public_key], g.index_of(k.public_key))[:2] for k in keys]
        state, receipt = execute(g, state, ups, [])
        assert len(receipt.accepted) == n
        acc.append(task.evaluate(state.model, test).accuracy)
    return acc


def test_fedavg_on_digits_reaches_90_percent_in_20_rounds() -> None:
    acc = train_rounds(genesis(), 20)
    assert max(acc) >= 0.90, acc
    assert acc[-1] > acc[0]


@pytest.mark.parametrize("aggregator, model, part", [("median", "mlp", "iid"), ("trimmed_mean", "logreg", "dirichlet")])
def test_other_rules_and_models_learn(aggregator: str, model: str, part: str) -> None:
    acc = train_rounds(genesis(aggregator=aggregator, model=model, part=part), 8)
    assert acc[-1] > 0.5, acc


def test_dirichlet_split_is_skewed_and_complete() -> None:
    g = genesis(part="dirichlet")
    train, _ = load_dataset(g.task)
    parts = partition(train, 4, g.task)
    assert sum(len(p) for p in parts) == len(train) and all(len(p) > 0 for p in parts)
    hist = np.array([np.bincount(p.y, minlength=10) / len(p) for p in parts])
    assert hist.std(axis=0).mean() > 0.03  # label mixes differ between participants


def test_initial_model_hash_is_checked() -> None:
    g = genesis()
    with pytest.raises(GenesisError):
        genesis_state(replace(g, initial_model_hash="00" * 32))


# ---------------------------------------------------------------- validation


def _one_update(g: Genesis, state: object, key: NodeKey, **change: object) -> tuple[UpdateAnnouncement, bytes]:
    data = participant_data(g.task, len(g.validators), g.index_of(key.public_key))
    ann, blob, _ = make_update(g, key, state, data, g.index_of(key.public_key))  # type: ignore[arg-type]
    return ann, blob


def _reblob(g: Genesis, key: NodeKey, ann: UpdateAnnouncement, blob: bytes) -> tuple[UpdateAnnouncement, bytes]:
    return replace(ann, blob_hash=digest(blob), blob_size=len(blob)).signed(key, g.chain_id), blob


def test_every_rejection_reason() -> None:
    g = genesis(norm_bound=50.0)
    s0 = genesis_state(g)
    k = KEYS[0]
    ann, blob = _one_update(g, s0, k)
    spec = task_for(g.task).param_spec()
    good = {name: np.zeros(shape, np.float32) for name, shape in spec}

    def outcome(pairs: list[tuple[UpdateAnnouncement, bytes]]) -> dict[str, str]:
        _, receipt = execute(g, s0, pairs, [])
        return {r[2] for r in receipt.rejected} if receipt.rejected else set()  # type: ignore[return-value]

    nan = dict(good, w=np.full(good["w"].shape, np.nan, np.float32))
    huge = dict(good, w=np.full(good["w"].shape, 10.0, np.float32))
    wrong = {"w": np.zeros((3, 3), np.float32)}
    assert outcome([_reblob(g, k, ann, encode_tensors(nan))]) == {Reason.NON_FINITE}
    assert outcome([_reblob(g, k, ann, encode_tensors(huge))]) == {Reason.NORM_BOUND}
    assert outcome([_reblob(g, k, ann, encode_tensors(wrong))]) == {Reason.WRONG_SHAPE}
    assert outcome([_reblob(g, k, ann, b"\x93garbage")]) == {Reason.MALFORMED_BLOB}
    assert outcome([(replace(ann, blob_size=ann.blob_size + 1).signed(k, g.chain_id), blob)]) == {Reason.SIZE_MISMATCH}
    other = _reblob(g, k, ann, encode_tensors(good))
    assert outcome([(ann, blob), other]) == {Reason.EQUIVOCATION}
    # block-invalidating announcements
    for bad, why in [
        (replace(ann, height=5).signed(k, g.chain_id), "wrong_height"),
        (replace(ann, base_model_hash=digest(b"x")).signed(k, g.chain_id), "wrong_base"),
        (replace(ann, num_samples=7), "bad_signature"),
        (replace(ann, author=KEYS[6].public_key).signed(KEYS[6], g.chain_id), "not_participant"),
        (replace(ann, blob_size=g.rules.max_blob_bytes + 1).signed(k, g.chain_id), "oversize"),
    ]:
        with pytest.raises(ValidationError, match=why):
            execute(g, s0, [(bad, blob)], [])
    with pytest.raises(ValidationError, match="twice"):
        execute(g, s0, [(ann, blob), (ann, blob)], [])


def test_rewards_penalties_and_exclusion() -> None:
    g = genesis(rewards={"reward_per_sample": 2, "reward_cap": 500, "penalty_rejected": 30, "exclude_below": 50,
                         "initial_reputation": 100, "max_reputation": 100, "reputation_gain": 1,
                         "penalty_outlier": 5, "penalty_equivocation": 50})
    s = genesis_state(g)
    bad_key = KEYS[1]
    spec = task_for(g.task).param_spec()
    nan = {name: np.full(shape, np.nan, np.float32) for name, shape in spec}
    for _ in range(2):
        pairs = []
        for k in KEYS[:4]:
            ann, blob = _one_update(g, s, k)
            if k is bad_key:
                ann, blob = _reblob(g, k, ann, encode_tensors(nan))
            pairs.append((ann, blob))
        s, receipt = execute(g, s, pairs, [])
        assert receipt.rewards[KEYS[0].public_key] == min(2 * pairs[0][0].num_samples, 500)
        assert receipt.penalties == {bad_key.public_key: 30}
    assert s.reputation[bad_key.public_key] == 40 and s.reputation[KEYS[0].public_key] == 100
    assert bad_key.public_key in receipt.excluded
    ann, blob = _one_update(g, s, bad_key)
    with pytest.raises(ValidationError, match="excluded"):
        execute(g, s, [(ann, blob)], [])


# ---------------------------------------------------------------- aggregation


def _random_updates(seed: int, n: int, shape: tuple[int, ...] = (5, 3)) -> list[WeightedUpdate]:
    rng = np.random.default_rng(seed)
    return [
        WeightedUpdate(digest(b"%d-%d" % (seed, i)), bytes([i]) * 32, {"w": rng.normal(size=shape).astype(np.float32)},
                       int(rng.integers(1, 100)))
        for i in range(n)
    ]


def reference(rule: str, ups: list[WeightedUpdate], rules: Rules) -> np.ndarray:
    """Slow, obvious implementations, coordinate by coordinate in Python floats."""
    ups = sorted(ups, key=lambda u: u.key)
    flat = [u.delta["w"].astype(np.float64).ravel().tolist() for u in ups]
    n, d = len(flat), len(flat[0])
    out = []
    for j in range(d):
        col = [flat[i][j] for i in range(n)]
        if rule == "fedavg":
            counts = [u.num_samples for u in ups]
            if rules.weight_median_multiple:  # clip to the multiple of the lower median
                cap = rules.weight_median_multiple * sorted(counts)[(n - 1) // 2]
                counts = [min(c, cap) for c in counts]
            tot = math.fsum(counts)
            acc = 0.0
            for c, x in zip(counts, col, strict=True):
                acc += (c / tot) * x
            out.append(acc)
        elif rule == "median":
            s = sorted(col)
            out.append(s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * 0.5)
        elif rule == "trimmed_mean":
            k = min(int(rules.trim_fraction * n), (n - 1) // 2)
            s = sorted(col)[k : n - k]
            acc = 0.0
            for x in s:
                acc += x
            out.append(acc / len(s))
    return np.array(out).reshape(ups[0].delta["w"].shape)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), rule=st.sampled_from(["fedavg", "median", "trimmed_mean"]),
       multiple=st.sampled_from([0, 1, 2, 3]))
@settings(max_examples=examples(80), deadline=None, suppress_health_check=list(HealthCheck))
def test_aggregators_match_the_reference(seed: int, n: int, rule: str, multiple: int) -> None:
    rules = Rules(aggregator=rule, trim_fraction=0.2, weight_median_multiple=multiple)
    ups = _random_updates(seed, n)
    base = {"w": np.zeros((5, 3), np.float32)}
    got = aggregate(base, ups, rules).new_model["w"]
    want = (0.0 + reference(rule, ups, rules)).astype(np.float32)
    assert np.array_equal(got, want)


def test_multi_krum_drops_the_attacker() -> None:
    ups = _random_updates(1, 7)
    attacker = replace(ups[3], delta={"w": ups[3].delta["w"] * 0 + 100.0})
    ups[3] = attacker
    res = aggregate({"w": np.zeros((5, 3), np.float32)}, ups, Rules(aggregator="multi_krum", krum_byzantine=2))
    assert attacker.author in res.outliers
    assert np.abs(res.new_model["w"]).max() < 10


def _cc_reference(ups: list[WeightedUpdate]) -> np.ndarray:
    """Centered clipping on whole float64 arrays: median start, tau = lower median distance, 3 iterations."""
    from test_aggregation_history import cc, median

    xs = [u.delta["w"].astype(np.float64).reshape(-1) for u in sorted(ups, key=lambda u: u.key)]  # type: ignore[union-attr]
    return cc(xs, median(xs)).reshape(ups[0].delta["w"].shape)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 9))
@settings(max_examples=examples(40), deadline=None, suppress_health_check=list(HealthCheck))
def test_centered_clip_matches_the_reference(seed: int, n: int) -> None:
    ups = _random_updates(seed, n)
    got = aggregate({"w": np.zeros((5, 3), np.float32)}, ups, Rules(aggregator="centered_clip")).new_model["w"]
    assert np.array_equal(got, (0.0 + _cc_reference(ups)).astype(np.float32))


def test_centered_clip_bounds_a_large_attacker() -> None:
    ups = _random_updates(2, 7)
    ups[3] = replace(ups[3], delta={"w": ups[3].delta["w"] * 0 + 1000.0})
    res = aggregate({"w": np.zeros((5, 3), np.float32)}, ups, Rules(aggregator="centered_clip"))
    assert np.abs(res.new_model["w"]).max() < 5 and not res.outliers


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed_mean", "multi_krum", "centered_clip"])
def test_every_arrival_order_gives_the_same_model(rule: str) -> None:
    ups = _random_updates(3, 5)
    rules = Rules(aggregator=rule, krum_byzantine=1)
    base = {"w": np.ones((5, 3), np.float32)}
    hashes = {
        digest(aggregate(base, list(p), rules).new_model["w"].tobytes()) for p in itertools.permutations(ups)
    }
    assert len(hashes) == 1


SCRIPT = """
import numpy as np
from flnode.node.app import WeightedUpdate, aggregate
from flnode.protocol.genesis import Rules
from flnode.protocol.hashing import digest
rng = np.random.default_rng(5)
ups = [WeightedUpdate(digest(bytes([i])), bytes([i]) * 32, {"w": rng.normal(size=(300, 200)).astype(np.float32)}, 10 + i)
       for i in range(6)]
out = []
for rule in ("fedavg", "median", "trimmed_mean", "multi_krum", "centered_clip"):
    m = aggregate({"w": np.zeros((300, 200), np.float32)}, ups, Rules(aggregator=rule, krum_byzantine=1)).new_model
    out.append(digest(m["w"].tobytes()).hex())
print(",".join(out))
"""


def test_same_hash_across_processes_and_thread_settings() -> None:
    results = set()
    for threads in ("1", "2", "8"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        results.add(out.stdout.strip())
    assert len(results) == 1
