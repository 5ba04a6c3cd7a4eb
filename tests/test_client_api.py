"""The client API's contract: what a participant's own training code may return, and what happens
when it misbehaves. In-process and fast; no torch (tests/test_adapters*.py and tests/test_byo*.py have it)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flnode.cli.node_cmd import make_genesis
from flnode.node.app import execute, genesis_state, participant_data
from flnode.node.app.models import task_for
from flnode.node.app.participant import (
    Participant,
    TrainerError,
    clean_metrics,
    fit_update,
    make_update,
    sign_update,
    trainer_record,
)
from flnode.node.app.tasks import BuiltinClient, FunctionClient, load_trainer, round_config
from flnode.node.app.validation import Reason, check_update
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis, TaskSpec
from flnode.protocol.hashing import digest
from flnode.protocol.tensors import decode_tensors, encode_tensors, tensors_hash

KEYS = [NodeKey(bytes([i + 90]) * 32) for i in range(4)]
SHAPES = [(64, 10), (10,)]


class LinearClient:
    """A minimal NumPyClient-shaped client: softmax regression on the node's digits shard, numpy only."""

    def __init__(self, ctx: Any) -> None:
        self.data = ctx.train_data() if ctx is not None else None
        rng = np.random.default_rng(0)
        self.init = [(rng.standard_normal(SHAPES[0]) * 0.01).astype(np.float32), np.zeros(10, np.float32)]

    def parameter_names(self) -> list[str]:
        return ["w", "b"]

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [p.copy() for p in self.init]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        w, b = parameters
        assert self.data is not None
        x, y = self.data.x, self.data.y
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
        p[np.arange(len(y)), y] -= 1
        g = p / len(y)
        lr = np.float32(config["lr"])
        return [w - lr * (x.T @ g).astype(np.float32), b - lr * g.sum(0).astype(np.float32)], len(y), {
            "loss": loss, "accuracy": float((z.argmax(1) == y).mean()), "note": "x" * 500, "bad": [1, 2]}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        return 0.5, 10, {"accuracy": 0.75}


def make_linear(ctx: Any) -> LinearClient:
    return LinearClient(ctx)


def genesis_with(trainer: str = "test_client_api:make_linear", **task: Any) -> Genesis:
    overrides = {"model": "custom", "trainer": trainer, "learning_rate": 0.5, **task}
    return make_genesis("byo", [(f"n{i}", k.public_key) for i, k in enumerate(KEYS)], overrides, {})


class Broken(LinearClient):
    def __init__(self, ctx: Any, mode: str) -> None:
        super().__init__(ctx)
        self.mode = mode

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        new, n, m = super().fit(parameters, config)
        if self.mode == "raise":
            raise RuntimeError("CUDA out of memory (simulated)")
        if self.mode == "shape":
            new[0] = new[0][:, :5]
        if self.mode == "count":
            new = new[:1]
        if self.mode == "nan":
            new[1][3] = np.nan
        if self.mode == "dtype":
            new[0] = new[0].astype(np.float64)
        if self.mode == "slow":
            time.sleep(0.3)
        if self.mode == "samples":
            n = 0
        return new, n, m


def ctx_for(g: Genesis, i: int) -> Any:
    from flnode.node.app.tasks import ClientContext

    return ClientContext(g.task, i, len(g.validators))


def test_the_genesis_records_names_shapes_dtypes_and_the_initial_hash() -> None:
    g = genesis_with()
    assert g.task.params == (("w", (64, 10), "float32"), ("b", (10,), "float32"))
    init = LinearClient(None).get_parameters({})
    assert g.initial_model_hash == tensors_hash({"w": init[0], "b": init[1]}).hex()
    assert task_for(g.task).param_spec() == [("w", (64, 10)), ("b", (10,))]
    assert genesis_state(g).model_hash.hex() == g.initial_model_hash


def test_genesis_round_trips_and_old_genesis_files_keep_their_hash(tmp_path: Path) -> None:
    g = genesis_with()
    g.save(tmp_path / "g.json")
    g2 = Genesis.load(tmp_path / "g.json")
    assert g2 == g and g2.hash() == g.hash()
    old = make_genesis("old", [("n0", KEYS[0].public_key)], {}, {})
    for name in ("trainer", "params", "initial_params", "lr_decay", "train_budget_ms"):
        assert name not in json.loads(old.canonical_bytes())["task"]  # a genesis without a client hashes as before


def test_validation_uses_the_declared_parameters_and_never_imports_the_trainer() -> None:
    g = genesis_with()
    g = replace(g, task=replace(g.task, trainer="no_such_module_anywhere:make"))  # verification needs no code
    state = genesis_state(g)
    good = {"w": np.zeros((64, 10), np.float32), "b": np.ones(10, np.float32) * 0.01}
    bad = {"w": np.zeros((64, 5), np.float32), "b": np.zeros(10, np.float32)}
    for tensors, reason in ((good, None), (bad, Reason.WRONG_SHAPE)):
        from flnode.node.app.models import TrainResult

        ann, blob = sign_update(g, KEYS[0], state, TrainResult(tensors, 10, 0.1, 0.5))
        assert check_update(g, state, ann, blob)[1] == reason


def test_a_client_trains_rounds_and_the_update_is_the_difference() -> None:
    g = genesis_with()
    state = genesis_state(g)
    clients = [load_trainer(g.task.trainer, ctx_for(g, i)) for i in range(4)]
    for _ in range(3):
        ups = []
        for i, c in enumerate(clients):
            out = fit_update(g, state, c, i)
            new, _, _ = c.fit([state.model["w"].copy(), state.model["b"].copy()], round_config(g.task, state.height + 1, i))
            np.testing.assert_array_equal(out.result.delta["w"], new[0] - state.model["w"])  # new - base, float32
            assert out.result.delta["w"].dtype == np.float32
            ups.append(sign_update(g, KEYS[i], state, out.result))
        state, receipt = execute(g, state, ups)
        assert len(receipt.accepted) == 4
    assert state.height == 3 and out.result.loss < 2.3


def test_metrics_are_canonical_and_capped() -> None:
    m = clean_metrics({"loss": np.float32(0.123456789), "acc": 1, "s": "y" * 500, "nan": math.nan, "l": [1],
                       **{f"k{i:02}": i for i in range(40)}})
    assert len(m) == 16 and all(len(k) <= 64 for k in m)
    assert all(isinstance(v, bool | int | float | str) for v in m.values())
    assert "nan" not in m and "l" not in m
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize(
    ("mode", "kind", "words"),
    [
        ("raise", "exception", "RuntimeError: CUDA out of memory (simulated)"),
        ("shape", "wrong_shape", "parameter w has shape (64, 5)"),
        ("count", "wrong_shape", "returned 1 arrays, the genesis has 2"),
        ("nan", "non_finite", "parameter b has NaN"),
        ("dtype", "wrong_dtype", "parameter w is float64"),
        ("slow", "timeout", "over the round's budget"),
        ("samples", "wrong_type", "num_examples 0"),
    ],
)
def test_a_faulty_client_costs_its_node_the_round_with_one_line(mode: str, kind: str, words: str) -> None:
    g = genesis_with(train_budget_ms=200)
    p = Participant(g, Broken(ctx_for(g, 0), mode), 0)
    state = genesis_state(g)
    with pytest.raises(TrainerError) as ei:
        make_update(g, KEYS[0], state, p, 0)
    assert ei.value.kind == kind and words in ei.value.line and "\n" not in ei.value.line
    assert trainer_record(p, 1) == {"trainer_error": ei.value.line, "trainer_error_kind": kind}
    p.client = LinearClient(ctx_for(g, 0))  # the next round with working code goes on
    ann, blob, _ = make_update(g, KEYS[0], state, p, 0)
    assert check_update(g, state, ann, blob)[1] is None
    assert trainer_record(p, 1)["fit_metrics"]["loss"] > 0


def test_a_plain_function_client() -> None:
    g = genesis_with()
    init = LinearClient(None).get_parameters({})

    def fit(parameters: list[np.ndarray], config: dict[str, Any]) -> list[np.ndarray]:
        return [p + np.float32(0.01) for p in parameters]

    out = fit_update(g, genesis_state(g), FunctionClient(fit, init), 0)
    assert np.allclose(out.result.delta["b"], 0.01) and out.result.num_samples == 1


def test_the_built_in_model_is_a_client_and_trains_bit_identically_to_its_sgd_function() -> None:
    g = make_genesis("b", [(f"n{i}", k.public_key) for i, k in enumerate(KEYS)], {"model": "mlp"}, {})
    state = genesis_state(g)
    data = participant_data(g.task, 4, 1)
    cfg = round_config(g.task, 1, 1)
    direct = task_for(g.task).train(state.model, data, lr=g.task.learning_rate, epochs=1, batch_size=32,
                                    seed=int(cfg["seed"]))
    via_api = fit_update(g, state, BuiltinClient(g.task, data), 1).result
    assert encode_tensors(direct.delta) == encode_tensors(via_api.delta)
    assert (direct.loss, direct.accuracy) == (via_api.loss, via_api.accuracy)


def test_parameters_round_trip_bit_exactly_through_the_codec() -> None:
    rng = np.random.default_rng(3)
    special = np.array([0.0, -0.0, np.float32(1e-45), -np.float32(3.4e38), np.nextafter(np.float32(1), 2)], np.float32)
    tensors: dict[str, Any] = {"a": rng.standard_normal((3, 4, 5)).astype(np.float32), "b": special, "c": np.float32(rng.random()),
               "d": rng.standard_normal(0).astype(np.float32)}
    blob = encode_tensors(tensors)
    back = decode_tensors(blob)
    assert list(back) == list(tensors)
    for k in tensors:
        assert back[k].shape == np.shape(tensors[k]) and back[k].tobytes() == np.asarray(tensors[k]).tobytes()
    assert digest(encode_tensors(back)) == digest(blob)


def test_the_learning_rate_schedule_comes_from_the_genesis() -> None:
    spec = TaskSpec(learning_rate=0.1, lr_decay=0.5)
    assert [round_config(spec, h, 0)["lr"] for h in (1, 2, 3)] == [0.1, 0.05, 0.025]
    assert round_config(spec, 3, 0)["server_round"] == 3
    assert round_config(spec, 3, 0)["seed"] != round_config(spec, 3, 1)["seed"]


def test_testnet_init_with_a_trainer_and_one_line_errors(tmp_path: Path) -> None:
    from flnode.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    ok = runner.invoke(app, ["testnet", "init", "--nodes", "2", "--dir", str(tmp_path / "t"),
                             "--trainer", "test_client_api:make_linear"])
    assert ok.exit_code == 0, ok.output
    g = Genesis.load(tmp_path / "t" / "node0" / "genesis.json")
    assert g.task.model == "custom" and g.task.trainer == "test_client_api:make_linear"
    assert [n for n, _, _ in g.task.params] == ["w", "b"]
    bad = runner.invoke(app, ["testnet", "init", "--nodes", "2", "--dir", str(tmp_path / "u"),
                              "--trainer", "no_such_module_xyz:make"])
    assert bad.exit_code == 2 and "no_such_module_xyz" in bad.output and "Traceback" not in bad.output


def test_a_node_whose_trainer_cannot_load_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    from flnode.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    assert runner.invoke(app, ["testnet", "init", "--nodes", "1", "--dir", str(tmp_path)]).exit_code == 0
    res = runner.invoke(app, ["start", "--home", str(tmp_path / "node0"), "--trainer", "no_such_mod_xyz:make"])
    assert res.exit_code == 2 and "cannot load the trainer" in res.output and "Traceback" not in res.output


def test_a_hand_edited_genesis_whose_initial_values_do_not_match_its_params_is_refused() -> None:
    from flnode.protocol.errors import GenesisError

    g = genesis_with()
    wrong = replace(g, task=replace(g.task, params=(("w", (64, 9), "float32"), ("b", (10,), "float32"))))
    with pytest.raises(GenesisError, match="does not match task.params"):
        genesis_state(wrong)
    with pytest.raises(GenesisError, match="base64"):
        genesis_state(replace(g, task=replace(g.task, initial_params="not base64!")))


class _KeepsItsWeights:
    """A client that trains its own arrays and returns them (a stateful client): the node must not write to them."""

    def __init__(self, init: list[np.ndarray]) -> None:
        self.weights = [w.copy() for w in init]

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return self.weights

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        self.weights = [p + np.float32(0.5) for p in parameters]
        return self.weights, 3, {"loss": 0.1}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        return 0.1, 1, {}


class _TrainsTheCopiesItWasGiven(_KeepsItsWeights):
    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        for p in parameters:
            p += np.float32(0.25)
        return parameters, 3, {"loss": 0.1}


def test_the_delta_is_made_in_place_only_in_the_copies_the_client_was_given() -> None:
    """new - base is computed in the client's output when that is one of the copies it was given (no third copy
    of a large model); a client's own arrays and the node's global model are never written."""
    g = genesis_with()
    state = genesis_state(g)
    before = {k: v.copy() for k, v in state.model.items()}
    init = LinearClient(None).get_parameters({})
    keeper = _KeepsItsWeights(init)
    out = fit_update(g, state, keeper, 0).result
    assert all(np.allclose(d, 0.5) for d in out.delta.values())
    assert all(np.array_equal(w, before[k] + np.float32(0.5)) for w, k in zip(keeper.weights, out.delta, strict=True))
    trained = fit_update(g, state, _TrainsTheCopiesItWasGiven(init), 0).result
    assert all(np.allclose(d, 0.25) for d in trained.delta.values())
    assert all(np.array_equal(state.model[k], before[k]) for k in before)
