"""Differential privacy: DP-SGD's per-example clipping against the slow definition, the accountant against
dp-accounting and an independent high-precision computation, the clip check, the budget rule, and epsilon as every
node, `chain verify` and `chain show` see it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import mpmath
import numpy as np
import pytest
from flnode.cli.main import app
from flnode.cli.node_cmd import _task_and_rules, make_genesis
from flnode.node.app import (
    Reason,
    decode_state,
    dp,
    encode_state,
    execute,
    genesis_state,
    make_update,
    participant_data,
    privacy,
)
from flnode.node.app.blocks import build_block
from flnode.node.app.models import MLP, LogisticRegression
from flnode.node.chain.store import ChainStore
from flnode.node.chain.verify import genesis_block_hash, verify_chain
from flnode.node.config import NodeConfig, write_config
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest
from flnode.protocol.messages import UpdateAnnouncement
from flnode.protocol.tensors import encode_tensors
from test_chain import certify, home_with_chain
from typer.testing import CliRunner

KEYS = [NodeKey(bytes([i + 90]) * 32) for i in range(4)]


def genesis(**rules: object) -> Genesis:
    task, r = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 2000)
    r.update(rules)
    return make_genesis("privacy", [(f"n{i}", k.public_key) for i, k in enumerate(KEYS)], task, r)


# ---------------------------------------------------------------- DP-SGD


@pytest.mark.parametrize("task", [LogisticRegression(6, 3), MLP(6, 3, 5)], ids=["logreg", "mlp"])
@pytest.mark.parametrize("clip", [0.05, 0.7, 1e6])
def test_per_example_clipping_matches_the_slow_reference(task: LogisticRegression, clip: float) -> None:
    rng = np.random.default_rng(3)
    params = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in task.init_params(1).items()}
    x = rng.standard_normal((9, 6)).astype(np.float32) * np.arange(1, 10, dtype=np.float32)[:, None]
    y = rng.integers(0, 3, 9)
    fast, _, _ = dp.clipped_sum(task, params, x, y, clip)
    slow = dp.reference_clipped_sum(task, params, x, y, clip)
    for k in params:
        np.testing.assert_allclose(fast[k], slow[k], rtol=1e-5, atol=1e-7 * max(1.0, min(clip, 100.0)))
    cache, g, _, _ = dp._output_grads(task, params, x, y)
    norms = np.sqrt(dp.per_example_sq_norms(task, params, cache, g))
    if clip < 1:  # the clip binds for most examples; the sum is at most n * C
        assert (norms > clip).sum() >= 5
        total = np.sqrt(sum(float(np.sum(v**2)) for v in fast.values()))
        assert total <= 9 * clip * (1 + 1e-9)
    else:  # no clipping: the plain gradient sum
        plain = task.backward(params, cache, g)
        for k in params:
            np.testing.assert_allclose(fast[k], plain[k], rtol=1e-6, atol=1e-9)


def test_dp_updates_use_secret_reproducible_noise() -> None:
    g = genesis(dp_mode="record", dp_noise=1.0, dp_sample_rate=0.1)
    state = genesis_state(g)
    data = participant_data(g.task, 4, 0)
    a = make_update(g, KEYS[0], state, data, 0)[1]
    assert make_update(g, KEYS[0], state, data, 0)[1] == a  # a restart re-publishes the same draw
    other_key = NodeKey(bytes([200]) * 32)  # same public data and seeds, another private key: other noise
    assert make_update(g, other_key, state, data, 0)[1] != a
    plain = make_update(genesis(), KEYS[0], state, data, 0)[1]
    assert plain != a


# ---------------------------------------------------------------- the accountant


def _reference_epsilon(q: float, z: float, steps: int, delta: float) -> float:
    """Poisson-subsampled Gaussian at integer orders, 50 digits (Mironov et al. 2019, eq. for integer alpha), then
    the conversion of Canonne et al. 2020 (Prop. 12) — written from the papers, not from dp-accounting."""
    mpmath.mp.dps = 50
    q_, z_ = mpmath.mpf(q), mpmath.mpf(z)
    best = mpmath.inf
    for a in privacy.ORDERS:
        s = mpmath.fsum(mpmath.binomial(a, k) * (1 - q_) ** (a - k) * q_**k * mpmath.exp((k * k - k) / (2 * z_**2))
                        for k in range(a + 1))
        rdp = steps * mpmath.log(s) / (a - 1)
        eps = rdp + mpmath.log1p(-mpmath.mpf(1) / a) - mpmath.log(mpmath.mpf(delta) * a) / (a - 1)
        best = min(best, eps)
    return float(best)


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.1, 1.0, 1), (0.05, 1.3, 20), (0.02, 0.8, 7)])
def test_record_level_epsilon_matches_an_independent_computation(q: float, z: float, rounds: int) -> None:
    g = genesis(dp_mode="record", dp_sample_rate=q, dp_noise=z)
    steps = dp.steps_per_round(g.rules, g.task.local_epochs)
    assert steps == round(1 / q)
    eps = privacy.epsilon(g, KEYS[0], rounds)
    assert eps == pytest.approx(_reference_epsilon(q, z, steps * rounds, 1e-5), rel=1e-9)


def test_participant_level_epsilon_matches_the_library_reference() -> None:
    # dp-accounting's own test: noise multiplier 4.530877117 gives exactly (1, 1e-6)-DP for one Gaussian release
    # (over fine fractional orders; our integer orders can only give a slightly larger epsilon).
    g = genesis(dp_mode="participant", dp_noise=4.530877117, dp_delta=1e-6)
    assert 1.0 <= privacy.epsilon(g, KEYS[0], 1) < 1.01
    # Composition of k releases is the Gaussian mechanism with multiplier z / sqrt(k).
    g4 = genesis(dp_mode="participant", dp_noise=4.530877117 * 2, dp_delta=1e-6)
    assert privacy.epsilon(g4, KEYS[0], 4) == pytest.approx(privacy.epsilon(g, KEYS[0], 1), rel=1e-9)
    # The individual updates carry z / sqrt(m): 4 participants, readers of the updates see z / 2.
    assert privacy.update_reader_epsilon(g, 1) == pytest.approx(privacy.epsilon(
        genesis(dp_mode="participant", dp_noise=4.530877117 / 2, dp_delta=1e-6), KEYS[0], 1), rel=1e-9)
    assert privacy.epsilon(genesis(), KEYS[0], 5) == 0.0  # DP off: no claim


def test_dp_off_keeps_old_genesis_and_state_hashes() -> None:
    g = genesis()
    assert "dp_mode" not in json.loads(g.canonical_bytes())["rules"]  # old genesis bytes, old hash
    assert Genesis.from_json_dict(g.to_json_dict()).hash() == g.hash()
    on = genesis(dp_mode="record", dp_budgets={"n1": 2.5})
    assert Genesis.from_json_dict(json.loads(json.dumps(on.to_json_dict()))).hash() == on.hash() != g.hash()
    s = genesis_state(g)
    assert encode_state(s) == encode_state(replace(s, dp_rounds={}))
    for slashed in ({}, {KEYS[1].public_key: 7}):
        t = replace(s, slashed=slashed, dp_rounds={KEYS[0].public_key: 3})
        back = decode_state(encode_state(t), t.model)
        assert back.dp_rounds == t.dp_rounds and back.slashed == slashed and back.hash() == t.hash() != s.hash()


# ---------------------------------------------------------------- validators' clip check


def _signed(g: Genesis, key: NodeKey, state: object, delta: dict[str, np.ndarray]) -> tuple[UpdateAnnouncement, bytes]:
    blob = encode_tensors(delta)
    ann = UpdateAnnouncement(height=1, base_model_hash=state.model_hash, blob_hash=digest(blob),  # type: ignore[attr-defined]
                             blob_size=len(blob), num_samples=100, loss_ppm=0, accuracy_ppm=0, author=key.public_key)
    return ann.signed(key, g.chain_id), blob


def test_clip_bound_is_checked_by_validators() -> None:
    g = genesis(dp_mode="participant", dp_clip=0.5, dp_noise=1.0)
    state = genesis_state(g)
    d = sum(v.size for v in state.model.values())
    bound = dp.update_bound_for(g)
    assert bound == pytest.approx(0.5 + 0.5 / 2 * (np.sqrt(d) + dp.NOISE_TAIL))
    honest = [make_update(g, k, state, participant_data(g.task, 4, i), i)[:2] for i, k in enumerate(KEYS[:3])]
    # An update that skipped the clip: the plain local update, scaled far beyond C + the noise's norm.
    big = {k: np.full(v.shape, 2 * bound / np.sqrt(d), np.float32) for k, v in state.model.items()}
    _, receipt = execute(g, state, [*honest, _signed(g, KEYS[3], state, big)])
    assert len(receipt.accepted) == 3
    assert [(a, why) for a, _, why in receipt.rejected] == [(KEYS[3].public_key, "dp_clip_bound")]
    assert receipt.penalties == {KEYS[3].public_key: g.rules.rewards.penalty_rejected}
    # A clipped update without its noise share: too small to carry the noise, refused.
    floor = dp.update_floor_for(g)
    assert floor > 2 * g.rules.dp_clip
    quiet = {k: np.full(v.shape, 0.4 / np.sqrt(d), np.float32) for k, v in state.model.items()}
    _, receipt = execute(g, state, [*honest, _signed(g, KEYS[3], state, quiet)])
    assert [(a, why) for a, _, why in receipt.rejected] == [(KEYS[3].public_key, "dp_noise_missing")]
    assert dp.update_floor_for(genesis()) == 0.0 and dp.update_bound_for(genesis()) == math.inf
    # Without DP the same update is within the general norm bound.
    _, plain = execute(genesis(), state, [_signed(genesis(), KEYS[3], state, big)])
    assert plain.accepted == (KEYS[3].public_key,)


# ---------------------------------------------------------------- budget, accounting on the chain


def test_budget_is_enforced_and_every_reader_agrees_on_epsilon(tmp_path: Path) -> None:
    base = genesis(dp_mode="record", dp_sample_rate=0.1, dp_noise=2.0)
    e2, e3 = privacy.epsilon(base, KEYS[0], 2), privacy.epsilon(base, KEYS[0], 3)
    g = genesis(dp_mode="record", dp_sample_rate=0.1, dp_noise=2.0, dp_budgets={"n0": (e2 + e3) / 2})
    n0 = KEYS[0].public_key
    data = {k.public_key: participant_data(g.task, 4, g.index_of(k.public_key)) for k in KEYS}
    state, prev, cert = genesis_state(g), genesis_block_hash(g), None
    blocks, blobs, receipts = [], {}, []
    for h in range(1, 5):
        assert privacy.may_spend_round(g, state, n0) == (h <= 2)  # what the trainer asks before training
        cands = []
        for k in KEYS:  # n0 is forced to train and publish anyway
            ann, blob, _ = make_update(g, k, state, data[k.public_key], g.index_of(k.public_key))
            blobs[ann.blob_hash] = blob
            cands.append((ann, blob))
        block, state, receipt = build_block(g, state, prev_block_hash=prev, last_commit=cert,
                                            proposer=KEYS[h % 4].public_key, time_ms=h, candidates=cands)
        cert = certify(g, block, KEYS[:3])
        blocks.append((block, cert, state, receipt))
        receipts.append(receipt)
        prev = block.hash()
    for h, r in enumerate(receipts, 1):
        refused = [a for a, _, why in r.rejected if why == Reason.PRIVACY_BUDGET_SPENT]
        assert refused == ([] if h <= 2 else [n0]) and len(r.accepted) == (4 if h <= 2 else 3)
    assert state.dp_rounds == {n0: 2, **{k.public_key: 4 for k in KEYS[1:]}}
    mine = privacy.report(g, state)

    home = home_with_chain(tmp_path / "home", g, blocks, blobs)
    store = ChainStore.open(home / "data" / "chain.sqlite", readonly=True, genesis_hash=g.hash())
    report = verify_chain(store, g)  # re-executes every height: the same dp rounds, or the app hash would differ
    assert report.ok and report.heights == 4, report.reason
    assert store.get_state(4).dp_rounds == state.dp_rounds
    store.close()
    privacy._epsilon.cache_clear()  # a second computation from scratch
    assert privacy.report(g, state) == mine
    runner = CliRunner()
    shown = json.loads(runner.invoke(app, ["chain", "show", "--home", str(home), "--json"]).output)["privacy"]
    assert shown == mine
    row = next(p for p in shown if p["name"] == "n0")
    assert row["rounds"] == 2 and row["exhausted"] and row["guarantee"] == "declared"
    assert row["epsilon_spent"] == pytest.approx(e2, abs=1e-6) and row["epsilon_left"] > 0
    detail = json.loads(runner.invoke(app, ["chain", "show", "--home", str(home), "--height", "3", "--json"]).output)
    assert "rejected: privacy_budget_spent" in [u["outcome"] for u in detail["updates"]]
    table = runner.invoke(app, ["chain", "show", "--home", str(home)], env={"COLUMNS": "200"}).output
    assert "declared" in table and "budget spent" in table
    write_config(home, NodeConfig(moniker="n0"))  # `flnode status` shows the node's own epsilon
    status = json.loads(runner.invoke(app, ["status", "--home", str(home), "--json"]).output)
    assert status["epsilon_spent"] == row["epsilon_spent"] and status["privacy"] == "declared, budget spent"


def test_participant_level_report_and_testnet_flags(tmp_path: Path) -> None:
    g = genesis(dp_mode="participant", dp_noise=3.0, dp_epsilon_budget=4.0)
    state = replace(genesis_state(g), dp_rounds={k.public_key: 3 for k in KEYS})
    rows = privacy.report(g, state)
    assert {r["rounds"] for r in rows} == {3} and all(r["epsilon_budget"] == 4.0 for r in rows)
    # Whoever reads the individual updates (noise z / sqrt(4) each) gets a weaker guarantee than the models' users.
    assert all(r["epsilon_vs_update_readers"] > r["epsilon_spent"] > 0 for r in rows)
    assert rows[0]["guarantee"].startswith("clip and noise size checked")

    runner = CliRunner()
    res = runner.invoke(app, ["testnet", "init", "--dir", str(tmp_path / "net"), "--nodes", "4", "--dp-mode", "record",
                              "--dp-noise", "1.2", "--dp-sample-rate", "0.1", "--dp-epsilon", "8",
                              "--dp-budget", "node3=2"])
    assert res.exit_code == 0, res.output
    r = Genesis.load(tmp_path / "net" / "node0" / "genesis.json").rules
    assert (r.dp_mode, r.dp_noise, r.dp_sample_rate, r.dp_epsilon_budget, r.dp_budgets) == ("record", 1.2, 0.1, 8.0,
                                                                                           {"node3": 2.0})
    bad = runner.invoke(app, ["testnet", "init", "--dir", str(tmp_path / "bad"), "--dp-mode", "everything"])
    assert bad.exit_code == 2 and "unknown dp_mode" in bad.output
    bad = runner.invoke(app, ["testnet", "init", "--dir", str(tmp_path / "bad2"), "--dp-mode", "record",
                              "--dp-budget", "nobody=1"])
    assert bad.exit_code == 2 and "not a validator" in bad.output
