"""The built-in models (logreg, MLP) and the genesis-declared model of a client: models as ordered dicts of
float32 tensors, trained with mini-batch SGD in plain numpy (the client API that runs them is node/app/tasks.py)."""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from flnode.protocol.genesis import Genesis, TaskSpec

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
        self, params: Tensors, data: Dataset, *, lr: float, epochs: int, batch_size: int, seed: int,
        in_place: bool = False,
    ) -> tuple[Tensors, int, float, float]:
        """Plain mini-batch SGD from `params`: (trained float32 params, samples, mean loss, accuracy while training).
        The one place the built-in models train (a DP-SGD variant would clip and noise `grads` here). `in_place`:
        the caller owns `params` (float32 copies) and they are trained as they are, with no copy of the model."""
        rng = np.random.default_rng(seed)
        w = {k: v.astype(np.float32, copy=not in_place) for k, v in params.items()}
        step = np.float32(lr)
        losses, correct, seen = [], 0, 0
        for _ in range(max(1, epochs)):
            order = rng.permutation(len(data))
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                x, y = data.x[idx], data.y[idx]
                logits, cache = self.forward(w, x)
                loss, g, pred = _softmax_xent(logits, y)
                grads = self.backward(w, cache, g)
                for k in w:  # in place: the same float32 products and differences, no temporary model copies
                    grad = grads[k].astype(np.float32, copy=False)
                    np.multiply(grad, step, out=grad)
                    np.subtract(w[k], grad, out=w[k])
                del grads, grad  # else this step's gradients live on while the next step's are computed
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


@functools.lru_cache(maxsize=8)
def _param_spec(spec: TaskSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(task_for(spec).param_spec())


def param_spec(genesis: Genesis) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every model tensor, in order."""
    return list(_param_spec(genesis.task))
