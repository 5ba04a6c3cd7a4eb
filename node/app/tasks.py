"""Models as ordered dicts of float32 tensors, and the client API every trainer goes through.

The built-in models (logreg, MLP) train with mini-batch SGD in plain numpy and are clients like any other: a
participant's own code is an object shaped like Flower's NumPyClient (see `Client`), loaded by name.

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

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainResult:
    delta: Tensors
    num_samples: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float


class Task(Protocol):
    name: str

    def param_spec(self) -> list[tuple[str, tuple[int, ...]]]: ...

    def init_params(self, seed: int) -> Tensors: ...

    def train(self, params: Tensors, data: Dataset, *, lr: float, epochs: int, batch_size: int, seed: int) -> TrainResult: ...

    def evaluate(self, params: Tensors, data: Dataset) -> Metrics: ...


def _softmax_xent(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy, d(loss)/d(logits), and predictions."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    n = y.shape[0]
    loss = float(-np.log(np.maximum(p[np.arange(n), y], 1e-12)).mean())
    g = p
    g[np.arange(n), y] -= 1.0
    return loss, g / n, z.argmax(axis=1)


class _SGDTask:
    name = "base"

    def param_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        raise NotImplementedError

    def init_params(self, seed: int) -> Tensors:
        raise NotImplementedError

    def forward(self, params: Tensors, x: np.ndarray) -> tuple[np.ndarray, object]:
        raise NotImplementedError

    def backward(self, params: Tensors, cache: object, g: np.ndarray) -> Tensors:
        raise NotImplementedError

    def train(self, params: Tensors, data: Dataset, *, lr: float, epochs: int, batch_size: int, seed: int) -> TrainResult:
        w, n, loss, accuracy = self.fit_params(params, data, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed)
        delta = {k: (w[k] - params[k]).astype(np.float32) for k in params}
        return TrainResult(delta, n, loss, accuracy)

    def fit_params(
        self, params: Tensors, data: Dataset, *, lr: float, epochs: int, batch_size: int, seed: int
    ) -> tuple[Tensors, int, float, float]:
        """Plain mini-batch SGD from `params`: (trained float32 params, samples, mean loss, accuracy while training).
        The one place the built-in models train (a DP-SGD variant would clip and noise `grads` here)."""
        rng = np.random.default_rng(seed)
        w = {k: v.astype(np.float32, copy=True) for k, v in params.items()}
        losses, correct, seen = [], 0, 0
        for _ in range(max(1, epochs)):
            order = rng.permutation(len(data))
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                x, y = data.x[idx], data.y[idx]
                logits, cache = self.forward(w, x)
                loss, g, pred = _softmax_xent(logits, y)
                grads = self.backward(w, cache, g)
                for k in w:
                    w[k] -= np.float32(lr) * grads[k].astype(np.float32)
                losses.append(loss * len(idx))
                correct += int((pred == y).sum())
                seen += len(idx)
        return w, len(data), float(sum(losses) / max(1, seen)), correct / max(1, seen)

    def evaluate(self, params: Tensors, data: Dataset) -> Metrics:
        logits, _ = self.forward(params, data.x)
        loss, _, pred = _softmax_xent(logits, data.y)
        return Metrics(loss, float((pred == data.y).mean()))


class LogisticRegression(_SGDTask):
    name = "logreg"

    def __init__(self, n_features: int, n_classes: int) -> None:
        self.d, self.c = n_features, n_classes

    def param_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        return [("w", (self.d, self.c)), ("b", (self.c,))]

    def init_params(self, seed: int) -> Tensors:
        rng = np.random.default_rng(seed)
        return {
            "w": (rng.standard_normal((self.d, self.c)) * 0.01).astype(np.float32),
            "b": np.zeros(self.c, dtype=np.float32),
        }

    def forward(self, params: Tensors, x: np.ndarray) -> tuple[np.ndarray, object]:
        return x @ params["w"] + params["b"], x

    def backward(self, params: Tensors, cache: object, g: np.ndarray) -> Tensors:
        x = cache
        assert isinstance(x, np.ndarray)
        return {"w": x.T @ g, "b": g.sum(axis=0)}


class MLP(_SGDTask):
    """One hidden ReLU layer."""

    name = "mlp"

    def __init__(self, n_features: int, n_classes: int, hidden: int) -> None:
        self.d, self.c, self.h = n_features, n_classes, hidden

    def param_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        return [("w1", (self.d, self.h)), ("b1", (self.h,)), ("w2", (self.h, self.c)), ("b2", (self.c,))]

    def init_params(self, seed: int) -> Tensors:
        rng = np.random.default_rng(seed)
        return {
            "w1": (rng.standard_normal((self.d, self.h)) * np.sqrt(2.0 / self.d)).astype(np.float32),
            "b1": np.zeros(self.h, dtype=np.float32),
            "w2": (rng.standard_normal((self.h, self.c)) * np.sqrt(1.0 / self.h)).astype(np.float32),
            "b2": np.zeros(self.c, dtype=np.float32),
        }

    def forward(self, params: Tensors, x: np.ndarray) -> tuple[np.ndarray, object]:
        pre = x @ params["w1"] + params["b1"]
        hidden = np.maximum(pre, 0)
        return hidden @ params["w2"] + params["b2"], (x, pre, hidden)

    def backward(self, params: Tensors, cache: object, g: np.ndarray) -> Tensors:
        assert isinstance(cache, tuple)
        x, pre, hidden = cache
        gh = (g @ params["w2"].T) * (pre > 0)
        return {"w1": x.T @ gh, "b1": gh.sum(axis=0), "w2": hidden.T @ g, "b2": g.sum(axis=0)}


class DeclaredModel(_SGDTask):
    """A model whose training code is the participant's own (a client): the genesis declares its parameters'
    names, shapes and dtypes and carries the initial values. Validation and aggregation need nothing else, so
    they never import or run user code (forward, and so train and evaluate, are the client's alone)."""

    name = "custom"

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def param_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(shape)) for name, shape, _ in self.spec.params]

    def dtypes(self) -> list[str]:
        return [dtype for _, _, dtype in self.spec.params]

    def init_params(self, seed: int) -> Tensors:
        from flnode.protocol.errors import GenesisError, ProtocolError
        from flnode.protocol.tensors import decode_tensors

        try:
            model = decode_tensors(base64.b64decode(self.spec.initial_params, validate=True))
        except (ValueError, ProtocolError) as exc:
            raise GenesisError(f"genesis: task.initial_params is not a tensor blob in base64 ({exc})") from None
        if [(k, tuple(v.shape)) for k, v in model.items()] != self.param_spec():
            raise GenesisError("genesis: task.initial_params does not match task.params (names and shapes)")
        return model

    def forward(self, params: Tensors, x: np.ndarray) -> tuple[np.ndarray, object]:
        raise ValueError("a custom model is trained and evaluated by its participants' clients only")


def make_task(spec: TaskSpec, n_features: int, n_classes: int) -> _SGDTask:
    if spec.model == "logreg":
        return LogisticRegression(n_features, n_classes)
    if spec.model == "mlp":
        return MLP(n_features, n_classes, spec.hidden)
    raise ValueError(f"unknown model {spec.model!r} (logreg | mlp | custom with a trainer)")


def task_for(spec: TaskSpec) -> _SGDTask:
    """The task with the data set's shape (features, classes), or the genesis-declared model of a client."""
    if spec.params:
        return DeclaredModel(spec)
    full = load_full(spec)
    return make_task(spec, int(full.x.shape[1]), full.n_classes)


def initial_model(spec: TaskSpec) -> Tensors:
    """The genesis model: what `initial_model_hash` commits to."""
    return task_for(spec).init_params(spec.seed)


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
            from .dp import fit_params_dp

            w, n, loss, acc = fit_params_dp(self.model, dict(zip(self.names, parameters, strict=True)), self.train,
                                            config)
            return [w[k] for k in self.names], n, {"loss": loss, "accuracy": acc}
        w, n, loss, acc = self.model.fit_params(
            dict(zip(self.names, parameters, strict=True)), self.train, lr=float(config["lr"]),
            epochs=int(config["local_epochs"]), batch_size=int(config["batch_size"]), seed=int(config["seed"]),
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
