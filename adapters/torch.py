"""PyTorch models as flnode clients.

The parameter rule: the federated parameters of a model are the floating-point entries of its `state_dict()`, in
`state_dict()` order, as float32 arrays. That includes floating buffers (BatchNorm's running mean and variance,
averaged like weights, as Flower's `get_parameters` over `state_dict()` does) and excludes integer buffers
(BatchNorm's `num_batches_tracked`), which stay local. `include_buffers=False` keeps only the entries that are
trainable parameters (`named_parameters()`); the other buffers then stay local too. A model kept in float64 or
float16 is sent as float32 and loaded back in its own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

Config = dict[str, Any]
OptimizerFactory = Callable[[Iterable[nn.Parameter], Config], torch.optim.Optimizer]


def federated_names(model: nn.Module, include_buffers: bool = True) -> list[str]:
    """The state_dict keys that are federated, in state_dict order (see the module's rule)."""
    trainable = {name for name, _ in model.named_parameters()}
    return [
        name for name, t in model.state_dict().items()
        if t.is_floating_point() and (include_buffers or name in trainable)
    ]


def state_to_arrays(model: nn.Module, names: list[str]) -> list[np.ndarray]:
    """The named state_dict entries as float32 numpy copies (never views of the live tensors)."""
    state = model.state_dict()
    return [state[n].detach().to("cpu", torch.float32).numpy().copy() for n in names]


def arrays_to_state(model: nn.Module, names: list[str], arrays: list[np.ndarray]) -> None:
    """Load arrays into the named entries, each converted to its entry's dtype and device; others untouched."""
    if len(arrays) != len(names):
        raise ValueError(f"{len(arrays)} arrays for {len(names)} parameters")
    state = model.state_dict()
    with torch.no_grad():
        for n, a in zip(names, arrays, strict=True):
            target = state[n]
            if tuple(a.shape) != tuple(target.shape):
                raise ValueError(f"parameter {n}: shape {tuple(a.shape)} is not the model's {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(a)).to(target.device, target.dtype))


def sgd(params: Iterable[nn.Parameter], config: Config) -> torch.optim.Optimizer:
    """The default optimizer: plain SGD at the round's learning rate (from the chain's schedule)."""
    return torch.optim.SGD(params, lr=float(config.get("lr", 0.01)))


class TorchClient:
    """A ready client for a classification model: fit runs `local_epochs` epochs (from the round config) of
    `loss_fn` over `train_loader` with a fresh optimizer from `optimizer_factory(params, config)`; evaluate
    reports loss and accuracy on `test_loader` (or the training data)."""

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        optimizer_factory: OptimizerFactory = sgd,
        *,
        test_loader: Iterable[Any] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        include_buffers: bool = True,
        device: str = "cpu",
        threads: int | None = 1,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)  # the node's event loop and the other nodes need the rest of the CPU
        self.model = model.to(device)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.optimizer_factory, self.device = optimizer_factory, device
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.names = federated_names(self.model, include_buffers)

    def parameter_names(self) -> list[str]:
        return list(self.names)

    def get_parameters(self, config: Config) -> list[np.ndarray]:
        return state_to_arrays(self.model, self.names)

    def fit(self, parameters: list[np.ndarray], config: Config) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        arrays_to_state(self.model, self.names, parameters)
        optimizer = self.optimizer_factory(self.model.parameters(), config)
        self.model.train()
        total_loss, correct, seen = 0.0, 0, 0
        for _ in range(max(1, int(config.get("local_epochs", 1)))):
            for x, y in self.train_loader:
                x, y = x.to(self.device), y.to(self.device)
                optimizer.zero_grad()
                out = self.model(x)
                loss = self.loss_fn(out, y)
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach()) * len(y)
                correct += int((out.argmax(1) == y).sum())
                seen += len(y)
        n = seen // max(1, int(config.get("local_epochs", 1)))
        return self.get_parameters(config), max(1, n), {"loss": total_loss / max(1, seen),
                                                        "accuracy": correct / max(1, seen)}

    def evaluate(self, parameters: list[np.ndarray], config: Config) -> tuple[float, int, dict[str, Any]]:
        arrays_to_state(self.model, self.names, parameters)
        self.model.eval()
        total_loss, correct, seen = 0.0, 0, 0
        with torch.no_grad():
            for x, y in self.test_loader if self.test_loader is not None else self.train_loader:
                x, y = x.to(self.device), y.to(self.device)
                out = self.model(x)
                total_loss += float(self.loss_fn(out, y)) * len(y)
                correct += int((out.argmax(1) == y).sum())
                seen += len(y)
        return total_loss / max(1, seen), seen, {"accuracy": correct / max(1, seen)}
