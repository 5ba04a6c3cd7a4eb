"""A participant lying about its sample count cannot take over FedAvg; admission checks; genesis compatibility."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flnode.cli.node_cmd import _task_and_rules, make_genesis
from flnode.node.app import (
    AppState,
    Reason,
    check_announcement_admission,
    execute,
    genesis_state,
    make_update,
    participant_data,
    samples_cap,
    task_for,
    update_blob_size,
)
from flnode.node.app.blocks import build_block
from flnode.protocol.crypto import NodeKey
from flnode.protocol.errors import GenesisError, ValidationError
from flnode.protocol.genesis import LATER_RULES, LATER_TASK, Genesis
from flnode.protocol.hashing import ZERO_HASH, digest
from flnode.protocol.messages import UpdateAnnouncement
from flnode.protocol.tensors import encode_tensors

KEYS = [NodeKey(bytes([i + 120]) * 32) for i in range(7)]


def genesis(n: int = 7, model: str = "logreg", **rules: object) -> Genesis:
    task, r = _task_and_rules(model, "digits", "iid", 0.5, "fedavg", 0, 1e6, 1, 0.1, 2000)
    r.update(rules)
    return make_genesis("byz", [(f"n{i}", k.public_key) for i, k in enumerate(KEYS[:n])], task, r)


def constant_update(g: Genesis, state: AppState, key: NodeKey, value: float, samples: int) -> tuple[UpdateAnnouncement, bytes]:
    blob = encode_tensors({name: np.full(shape, value, np.float32) for name, shape in task_for(g.task).param_spec()})
    ann = UpdateAnnouncement(state.height + 1, state.model_hash, digest(blob), len(blob), samples, 0, 0, key.public_key)
    return ann.signed(key, g.chain_id), blob


def model_delta(g: Genesis, before: AppState, after: AppState) -> np.ndarray:
    return np.concatenate([(after.model[k].astype(np.float64) - before.model[k]).ravel() for k in before.model])


def test_huge_sample_claim_cannot_take_over_fedavg() -> None:
    """Six honest +1 updates and one -50 claiming 2^40 samples: before the cap the model moved by about -50."""
    g = genesis()
    s0 = genesis_state(g)
    honest = [constant_update(g, s0, k, 1.0, samples_cap(g, k.public_key)) for k in KEYS[:6]]
    attack = constant_update(g, s0, KEYS[6], -50.0, 1 << 40)
    _, s1, receipt = build_block(g, s0, prev_block_hash=ZERO_HASH, last_commit=None, proposer=KEYS[0].public_key,
                                 time_ms=0, candidates=[*honest, attack])
    d = model_delta(g, s0, s1)
    assert d.min() >= 1.0 - 1e-4 and d.max() <= 1.0 + 1e-4  # within the honest range
    assert KEYS[6].public_key not in receipt.accepted
    assert check_announcement_admission(g, s0, attack[0]) == Reason.SAMPLES_OVER_CAP == "samples_over_cap"
    with pytest.raises(ValidationError, match="samples_over_cap"):  # a Byzantine proposer's block is invalid
        execute(g, s0, [*honest, attack], [])


def test_weights_are_clipped_to_a_multiple_of_the_median() -> None:
    """Within a generous genesis-wide cap, an inflated claim weighs at most 2x the lower median."""
    g = genesis(max_samples_per_update=10**6, rewards={"reward_per_sample": 1, "reward_cap": 10**9})
    s0 = genesis_state(g)
    honest = [constant_update(g, s0, k, 1.0, 100) for k in KEYS[:6]]
    attack = constant_update(g, s0, KEYS[6], -50.0, 10**6)
    s1, receipt = execute(g, s0, [*honest, attack], [])
    d = model_delta(g, s0, s1)
    want = (6 * 100 * 1.0 + 200 * -50.0) / 800  # weight 200 = 2 x 100, not 10^6
    assert np.allclose(d, want, atol=1e-4)
    assert receipt.rewards[KEYS[6].public_key] == 200 and receipt.rewards[KEYS[0].public_key] == 100
    off = genesis(max_samples_per_update=10**6, weight_median_multiple=0)
    s1_off, _ = execute(off, genesis_state(off), [
        constant_update(off, genesis_state(off), k, v, n) for k, v, n in [*[(k, 1.0, 100) for k in KEYS[:6]],
                                                                          (KEYS[6], -50.0, 10**6)]
    ], [])
    assert model_delta(off, s0, s1_off).max() < -40  # without the clip the claim wins


def test_honest_updates_declare_their_shard_and_fit_the_exact_size() -> None:
    for model in ("logreg", "mlp"):
        g = genesis(n=4, model=model)
        s0 = genesis_state(g)
        for k in KEYS[:4]:
            data = participant_data(g.task, 4, g.index_of(k.public_key))
            ann, blob, _ = make_update(g, k, s0, data, g.index_of(k.public_key))
            assert ann.num_samples == len(data) == samples_cap(g, k.public_key)
            assert len(blob) == ann.blob_size == update_blob_size(g)
            assert check_announcement_admission(g, s0, ann) is None
    # own data larger than the cap: the participant declares the cap
    g = genesis(n=4, max_samples_per_update=50)
    data = participant_data(g.task, 4, 0)
    ann, _, _ = make_update(g, KEYS[0], genesis_state(g), data, 0)
    assert ann.num_samples == 50 < len(data)


def test_admission_reasons() -> None:
    g = genesis(n=4)
    s0 = genesis_state(g)
    k = KEYS[0]
    data = participant_data(g.task, 4, 0)
    ann, blob, _ = make_update(g, k, s0, data, 0)
    cap = samples_cap(g, k.public_key)
    cases = [
        (replace(ann, author=KEYS[5].public_key).signed(KEYS[5], g.chain_id), "not_participant"),
        (replace(ann, height=2).signed(k, g.chain_id), "wrong_height"),
        (replace(ann, base_model_hash=digest(b"x")).signed(k, g.chain_id), "wrong_base"),
        (replace(ann, num_samples=cap + 1).signed(k, g.chain_id), "samples_over_cap"),
        (replace(ann, blob_size=ann.blob_size + 1).signed(k, g.chain_id), "wrong_blob_size"),
        (replace(ann, blob_size=ann.blob_size - 1).signed(k, g.chain_id), "wrong_blob_size"),
        (replace(ann, blob_size=g.rules.max_blob_bytes + 1).signed(k, g.chain_id), "oversize"),
        (replace(ann, num_samples=cap - 1), "bad_signature"),
        (replace(ann, num_samples=cap), None),
    ]
    for bad, why in cases:
        assert check_announcement_admission(g, s0, bad) == why, why
    low = replace(s0, reputation={**s0.reputation, k.public_key: 0})
    assert check_announcement_admission(g, low, ann) == "excluded"
    # a wrong declared size is only an admission rule: in a block it stays the author's (penalised) fault
    wrong = {"w": np.zeros((3, 3), np.float32)}
    wblob = encode_tensors(wrong)
    wann = replace(ann, blob_hash=digest(wblob), blob_size=len(wblob)).signed(k, g.chain_id)
    assert check_announcement_admission(g, s0, wann) == "wrong_blob_size"
    _, receipt = execute(g, s0, [(wann, wblob)], [])
    assert receipt.rejected[0][2] == "wrong_shape" and receipt.penalties
    # and an honest proposer leaves it out
    block, _, _ = build_block(g, s0, prev_block_hash=ZERO_HASH, last_commit=None, proposer=k.public_key, time_ms=0,
                              candidates=[(wann, wblob)])
    assert block.updates == ()


def test_genesis_without_the_new_rules_loads_and_keeps_its_hash(tmp_path: Path) -> None:
    g = genesis(n=4)
    d = json.loads(json.dumps(g.to_json_dict()))
    assert d["rules"]["max_samples_per_update"] == 0 and d["rules"]["weight_median_multiple"] == 2
    old = json.loads(json.dumps(d))
    for name in LATER_RULES:  # every rule added after the first release (privacy's dp_* included)
        del old["rules"][name]
    for name in LATER_TASK:  # and every later task field (the client API's)
        del old["task"][name]
    loaded = Genesis.from_json_dict(old)
    assert loaded == g and loaded.hash() == g.hash()
    # the hash of an old file is the hash of its bytes as before these rules existed
    legacy = json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    assert g.hash() == digest(legacy)
    # the hash covers the new rules when they are set
    assert replace(g, rules=replace(g.rules, max_samples_per_update=10)).hash() != g.hash()
    assert replace(g, rules=replace(g.rules, weight_median_multiple=3)).hash() != g.hash()
    g2 = replace(g, rules=replace(g.rules, max_samples_per_update=10))
    g2.save(tmp_path / "g.json")
    assert Genesis.load(tmp_path / "g.json") == g2 and Genesis.load(tmp_path / "g.json").hash() == g2.hash()
    bad = json.loads(json.dumps(d))
    bad["rules"]["max_samples_per_update"] = -1
    with pytest.raises(GenesisError, match="max_samples_per_update"):
        Genesis.from_json_dict(bad)
