"""The client API every trainer goes through.

The built-in models (node/app/models.py) are clients like any other: a participant's own code is an object shaped
like Flower's NumPyClient (see `Client`), loaded by name.

Local training need not be bit-identical across machines (only aggregation is, and it runs on the published
update bytes); it is seeded, so one machine reproduces its own run exactly.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from flnode.protocol.genesis import TaskSpec

from .data import Dataset, load_full
from .dp import fit_params_dp
from .models import TrainResult as TrainResult  # re-exported: participant.py imports it from here
from .models import initial_model as initial_model  # re-exported: state.py imports it from here
from .models import make_task


def local_seed(spec: TaskSpec, participant_index: int, height: int) -> int:
    """Seed of one participant's local run at one height: same inputs, same update."""
    h = hashlib.sha256(f"flnode-local/{spec.seed}/{participant_index}/{height}".encode()).digest()
    return int.from_bytes(h[:8], "big")


# ---------------------------------------------------------------- the client API (Flower's NumPyClient shape)

Parameters = list[np.ndarray]
Scalar = bool | int | float | str
Config = dict[str, Scalar]


class Client(Protocol):
    """What a participant's training code looks like: Flower's `NumPyClient`, duck-typed (no dependency on flwr).

    - get_parameters(config) -> list of arrays, in one fixed order (the genesis names them param_0.. unless
      the client has `parameter_names()`);
    - fit(parameters, config) -> (new parameters, number of training examples, metrics);
    - evaluate(parameters, config) -> (loss, number of examples, metrics)."""

    def get_parameters(self, config: Config) -> Parameters: ...

    def fit(self, parameters: Parameters, config: Config) -> tuple[Parameters, int, dict[str, Scalar]]: ...

    def evaluate(self, parameters: Parameters, config: Config) -> tuple[float, int, dict[str, Scalar]]: ...


@dataclass(frozen=True)
class ClientContext:
    """What a trainer factory (`trainer = "pkg.module:make_client"`) is called with."""

    task: TaskSpec
    participant_index: int  # position in the genesis' participant order (0 when making the genesis)
    n_participants: int
    data_path: str | None = None  # the node's own data file (config data_path), if any
    config: dict[str, Scalar] = field(default_factory=dict)  # the task's settings, for the factory's use

    @property
    def seed(self) -> int:
        """A seed for this participant's own randomness (model init, shuffling); training may be non-deterministic."""
        return local_seed(self.task, self.participant_index, 0) % (1 << 32)  # numpy, torch and sklearn take 32 bits

    def train_data(self) -> Dataset:
        """This participant's private data: its own .npz if configured, else its shard of the task's data set."""
        from .data import participant_data

        return participant_data(self.task, self.n_participants, self.participant_index, self.data_path)

    def test_data(self) -> Dataset:
        """The task's held-out test split (the same on every node)."""
        from .data import load_dataset

        return load_dataset(self.task)[1]


class FunctionClient:
    """The plain-function form: `fit(parameters, config) -> parameters` or `-> (parameters, n, metrics)`,
    with the initial parameters given once; `evaluate` is optional."""

    def __init__(
        self,
        fit: Callable[[Parameters, Config], Any],
        initial_parameters: Parameters,
        evaluate: Callable[[Parameters, Config], tuple[float, int, dict[str, Scalar]]] | None = None,
        num_examples: int = 1,
    ) -> None:
        self._fit, self._init, self._evaluate, self._n = fit, [np.asarray(p) for p in initial_parameters], evaluate, num_examples

    def get_parameters(self, config: Config) -> Parameters:
        return [p.copy() for p in self._init]

    def fit(self, parameters: Parameters, config: Config) -> tuple[Parameters, int, dict[str, Scalar]]:
        out = self._fit(parameters, config)
        if isinstance(out, tuple) and len(out) == 3:
            return out  # type: ignore[return-value]
        return list(out), self._n, {}

    def evaluate(self, parameters: Parameters, config: Config) -> tuple[float, int, dict[str, Scalar]]:
        if self._evaluate is None:
            return float("nan"), 0, {}
        return self._evaluate(parameters, config)


class BuiltinClient:
    """The built-in numpy models (logreg, MLP) as clients of the same API: one code path for every trainer."""

    def __init__(self, spec: TaskSpec, train: Dataset | None, test: Dataset | None = None) -> None:
        full = load_full(spec)
        self.spec, self.train, self.test = spec, train, test
        self.model = make_task(spec, int(full.x.shape[1]), full.n_classes)
        self.names = [n for n, _ in self.model.param_spec()]

    def get_parameters(self, config: Config) -> Parameters:
        init = self.model.init_params(self.spec.seed)
        return [init[n] for n in self.names]

    def fit(self, parameters: Parameters, config: Config) -> tuple[Parameters, int, dict[str, Scalar]]:
        assert self.train is not None, "a built-in client without data cannot train"
        if config.get("dp_mode") == "record":  # DP-SGD: per-example clipping and noise (node/app/dp.py)
            w, n, loss, acc = fit_params_dp(self.model, dict(zip(self.names, parameters, strict=True)), self.train,
                                            config)
            return [w[k] for k in self.names], n, {"loss": loss, "accuracy": acc}
        w, n, loss, acc = self.model.fit_params(  # the parameters are ours (fit_update hands out copies)
            dict(zip(self.names, parameters, strict=True)), self.train, lr=float(config["lr"]),
            epochs=int(config["local_epochs"]), batch_size=int(config["batch_size"]), seed=int(config["seed"]),
            in_place=True,
        )
        return [w[k] for k in self.names], n, {"loss": loss, "accuracy": acc}

    def evaluate(self, parameters: Parameters, config: Config) -> tuple[float, int, dict[str, Scalar]]:
        data = self.test if self.test is not None else self.train
        assert data is not None
        m = self.model.evaluate(dict(zip(self.names, parameters, strict=True)), data)
        return m.loss, len(data), {"accuracy": m.accuracy}


def as_client(obj: Any) -> Client:
    """A client object as is; a FunctionClient; or a (fit_function, initial_parameters) pair."""
    if all(callable(getattr(obj, m, None)) for m in ("get_parameters", "fit")):
        if not callable(getattr(obj, "evaluate", None)):
            obj.evaluate = lambda parameters, config: (float("nan"), 0, {})
        return obj  # type: ignore[no-any-return]
    if isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0]):
        return FunctionClient(obj[0], list(obj[1]))
    raise TypeError(
        f"a trainer must return an object with get_parameters/fit/evaluate (a Flower NumPyClient) or a "
        f"(fit_function, initial_parameters) pair, not {type(obj).__name__}"
    )


def load_trainer(ref: str, ctx: ClientContext) -> Client:
    """Import `pkg.module:factory` (the current directory is on the path, as for `python -m`) and call the factory
    with the context. A factory that takes no argument is called without one; a client class is instantiated."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"trainer {ref!r}: expected 'package.module:factory'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"trainer {ref!r}: module {module_name} has no {attr!r}") from None
    try:
        takes_ctx = bool(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        takes_ctx = True
    return as_client(factory(ctx) if takes_ctx else factory())


def builtin_or_loaded(spec: TaskSpec, ctx: ClientContext, trainer: str = "", with_data: bool = True) -> Client:
    """The client a node trains with: its configured trainer, else the genesis' trainer, else the built-in model."""
    ref = trainer or spec.trainer
    if ref:
        return load_trainer(ref, ctx)
    if spec.params:
        raise ValueError("the genesis declares a custom model: configure its trainer (trainer = 'pkg.module:make_client')")
    return BuiltinClient(spec, ctx.train_data() if with_data else None, ctx.test_data())


def round_config(spec: TaskSpec, height: int, participant_index: int) -> Config:
    """The per-round config every client's fit/evaluate gets, all from the chain: round number, the genesis'
    learning-rate schedule (learning_rate x lr_decay^(round-1)), epochs, batch size and a per-round seed."""
    lr = spec.learning_rate if spec.lr_decay == 1.0 else spec.learning_rate * spec.lr_decay ** (height - 1)
    return {
        "round": height, "server_round": height, "lr": lr, "learning_rate": lr, "local_epochs": spec.local_epochs,
        "batch_size": spec.batch_size, "seed": local_seed(spec, participant_index, height),
    }


def trainer_task_spec(spec: TaskSpec, n_participants: int) -> TaskSpec:
    """The genesis task of `spec.trainer`: its factory is called once as participant 0 and get_parameters({})
    fixes the parameters' names, shapes, dtypes and initial values."""
    client = load_trainer(spec.trainer, ClientContext(spec, 0, n_participants))
    return client_task_spec(spec, client, spec.trainer)


def client_task_spec(spec: TaskSpec, client: Client, trainer: str) -> TaskSpec:
    """The genesis task of a client: its parameters' names, shapes and dtypes and the initial values, all taken
    from get_parameters. Only float32 arrays are accepted (updates travel as float32; adapters convert)."""
    from flnode.protocol.tensors import encode_tensors

    params = [np.asarray(p) for p in client.get_parameters({})]
    names_fn = getattr(client, "parameter_names", None)
    names = list(names_fn()) if callable(names_fn) else [f"param_{i}" for i in range(len(params))]
    if not params or len(names) != len(params) or len(set(names)) != len(names):
        raise ValueError(f"trainer {trainer}: get_parameters returned {len(params)} arrays for {len(names)} names")
    for name, p in zip(names, params, strict=True):
        if p.dtype != np.float32:
            raise ValueError(f"trainer {trainer}: parameter {name} is {p.dtype}; return float32 arrays")
        if not np.isfinite(p).all():
            raise ValueError(f"trainer {trainer}: parameter {name} has NaN or infinite values")
    blob = encode_tensors(dict(zip(names, params, strict=True)))
    return replace(
        spec, model="custom", trainer=trainer,
        params=tuple((n, tuple(int(d) for d in p.shape), str(p.dtype)) for n, p in zip(names, params, strict=True)),
        initial_params=base64.b64encode(blob).decode(),
    )
