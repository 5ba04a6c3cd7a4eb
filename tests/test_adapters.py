"""flnode.adapters: PyTorch state_dict <-> float32 arrays (the buffer rule), TorchClient, the scikit-learn client,
the examples' clients under the contract, and the event loop's responsiveness while PyTorch trains in the worker
thread. CI installs the torch extra and sets FLNODE_REQUIRE_TORCH=1, so these fail rather than skip there."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pytest
import trio
from flnode.cli.node_cmd import make_genesis
from flnode.node.app import execute, genesis_state
from flnode.node.app.participant import TrainerError, check_parameters, load_participant, make_update
from flnode.protocol.crypto import NodeKey

if os.environ.get("FLNODE_REQUIRE_TORCH"):
    import sklearn  # noqa: F401
    import torch
else:
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")

from flnode.adapters.sklearn import SklearnClient  # noqa: E402
from flnode.adapters.torch import TorchClient, arrays_to_state, federated_names, state_to_arrays  # noqa: E402
from torch import nn  # noqa: E402

KEYS = [NodeKey(bytes([i + 120]) * 32) for i in range(4)]


def genesis(trainer: str, **task: Any) -> Any:
    return make_genesis("adapters", [(f"n{i}", k.public_key) for i, k in enumerate(KEYS)],
                        {"model": "custom", "trainer": trainer, **task}, {})


def test_the_buffer_rule_float_buffers_travel_integer_buffers_stay_local() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    names = federated_names(model)
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "2.weight",
                     "2.bias"]  # state_dict order; 1.num_batches_tracked (int64) is not federated
    assert "1.running_mean" not in federated_names(model, include_buffers=False)
    arrays = state_to_arrays(model, names)
    assert all(a.dtype == np.float32 for a in arrays)
    arrays[4][:] = 7.0
    arrays_to_state(model, names, arrays)
    assert torch.equal(model.state_dict()["1.running_mean"], torch.full((3,), 7.0))
    again = state_to_arrays(model, names)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(arrays, again, strict=True))  # bit-exact round trip
    model64 = nn.Linear(2, 2).double()
    arrays_to_state(model64, ["weight", "bias"], [np.ones((2, 2), np.float32), np.zeros(2, np.float32)])
    assert model64.weight.dtype == torch.float64 and float(model64.weight.detach().sum()) == 4.0
    with pytest.raises(ValueError, match="shape"):
        arrays_to_state(model, names, [np.zeros((1, 1), np.float32)] * len(names))


def test_the_pytorch_example_genesis_and_rounds() -> None:
    g = genesis("examples.pytorch_cnn.client:make_client")
    assert [n for n, _, _ in g.task.params] == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                                "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert {t for _, _, t in g.task.params} == {"float32"}
    ps = [load_participant(g, i) for i in range(4)]
    state = genesis_state(g)
    first = ps[0].evaluate(state.model)["test_accuracy"]
    for _ in range(6):
        ups = [make_update(g, k, state, ps[g.index_of(k.public_key)], g.index_of(k.public_key))[:2] for k in KEYS]
        state, receipt = execute(g, state, ups)
        assert len(receipt.accepted) == 4
    assert ps[0].evaluate(state.model)["test_accuracy"] > max(0.3, first + 0.15)


def test_the_flower_tutorial_class_joins_a_pytorch_genesis_unchanged() -> None:
    from examples.flower_client.client import FlowerClient

    g = genesis("examples.pytorch_cnn.client:make_client")
    p = load_participant(g, 1, trainer="examples.flower_client.client:make_client")
    assert type(p.client) is FlowerClient
    ann, blob, result = make_update(g, KEYS[1], genesis_state(g), p, 1)
    assert result.num_samples == len(p.client.trainloader)  # the tutorial reports batches; flnode takes it as is
    assert 0 < result.loss < 10  # fit returns no metrics: the loss is the tutorial's evaluate on the new model


def test_a_torch_client_with_wrong_dtype_or_nan_is_refused() -> None:
    g = genesis("examples.pytorch_cnn.client:make_client")
    p = load_participant(g, 0)
    good = p.client.get_parameters({})
    check_parameters(g, good)
    with pytest.raises(TrainerError, match="float64"):
        check_parameters(g, [good[0].astype(np.float64), *good[1:]])
    bad = [a.copy() for a in good]
    bad[3][0] = np.inf
    with pytest.raises(TrainerError, match="NaN or infinite"):
        check_parameters(g, bad)


def test_sklearn_sgd_and_warm_started_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    g = genesis("examples.sklearn_digits.client:make_client", learning_rate=0.1)
    assert g.task.params == (("coef", (10, 64), "float32"), ("intercept", (10,), "float32"))
    ps = [load_participant(g, i) for i in range(4)]
    state = genesis_state(g)
    for _ in range(3):
        ups = [make_update(g, k, state, ps[g.index_of(k.public_key)], g.index_of(k.public_key))[:2] for k in KEYS]
        state, receipt = execute(g, state, ups)
        assert len(receipt.accepted) == 4
    assert ps[0].evaluate(state.model)["test_accuracy"] > 0.9
    assert isinstance(ps[0].client.est, SGDClassifier)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] > 0).astype(int)
    lr = SklearnClient(LogisticRegression(warm_start=True, max_iter=1), x, y, [0, 1])
    init = lr.get_parameters({})
    assert [a.shape for a in init] == [(1, 5), (1,)] and all(a.dtype == np.float32 for a in init)
    new, n, metrics = lr.fit(init, {"local_epochs": 5})
    assert n == 200 and new[0][0, 0] > 0.1 and metrics["accuracy"] > 0.8
    with pytest.raises(ValueError, match="warm_start"):
        SklearnClient(LogisticRegression(), x, y, [0, 1])


async def test_the_event_loop_stays_responsive_while_pytorch_trains_in_the_worker_thread() -> None:
    """The daemon runs fit in a worker thread. PyTorch's kernels release the GIL, and its Python-side steps give it
    up at the interpreter's switch interval, so the loop keeps its turns: a 10 ms sleep wakes late by at most a
    few switch intervals, not by the length of the fit."""
    from flnode.node.app.data import load_dataset

    from examples.pytorch_cnn.client import DigitsCNN, loader

    train, _ = load_dataset(g_task := genesis("examples.pytorch_cnn.client:make_client").task)
    assert g_task.params
    client = TorchClient(DigitsCNN(), loader(train, True, 8))  # small batches: the most Python per second of work
    params = client.get_parameters({})
    lags: list[float] = []
    done = trio.Event()

    async def probe() -> None:
        while not done.is_set():
            t0 = trio.current_time()
            await trio.sleep(0.01)
            lags.append(trio.current_time() - t0 - 0.01)

    async with trio.open_nursery() as n:
        n.start_soon(probe)
        t0 = time.monotonic()
        await trio.to_thread.run_sync(client.fit, params, {"lr": 0.05, "local_epochs": 2})
        fit_s = time.monotonic() - t0
        done.set()
    lags.sort()
    p50, worst = lags[len(lags) // 2], lags[-1]
    print(f"fit {fit_s:.2f} s in the worker thread; loop lag p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms, "
          f"{len(lags)} wake-ups")
    assert fit_s > 0.2 and len(lags) > 10
    assert p50 < 0.05 and worst < min(0.5, fit_s / 2)  # loose: 2 shared cores; typical p50 is a few ms
