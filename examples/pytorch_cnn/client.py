"""A small CNN on the built-in 8x8 digits, each participant holding a Dirichlet(0.5) share of the classes.

    flnode demo --trainer examples.pytorch_cnn.client:make_client
    flnode testnet init --nodes 4 --dir testnet --trainer examples.pytorch_cnn.client:make_client

`make_client(context)` is what the node calls: it builds the model, the participant's data loader and the
optimizer, and hands them to flnode.adapters.torch.TorchClient (which speaks Flower's NumPyClient shape).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flnode.adapters.torch import TorchClient
from flnode.node.app.data import Dataset, load_dataset, partition
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers (8 and 16 channels, each followed by 2x2 max-pooling) and two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def loader(data: Dataset, shuffle: bool, batch_size: int = 32) -> DataLoader[Any]:
    images = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32).reshape(-1, 1, 8, 8))
    return DataLoader(TensorDataset(images, torch.from_numpy(data.y)), batch_size=batch_size, shuffle=shuffle)


def dirichlet_shard(context: Any) -> Dataset:
    """This participant's Dirichlet(0.5) share of the digits training split, the same split on every node (it is
    seeded by the genesis task); a node with its own data file (data_path) trains on that instead."""
    if context.data_path:
        return context.train_data()
    train, _ = load_dataset(context.task)
    spec = replace(context.task, partition="dirichlet", dirichlet_alpha=0.5)
    return partition(train, context.n_participants, spec)[context.participant_index]


def momentum_sgd(params: Any, config: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=float(config["lr"]), momentum=0.9)


def make_client(context: Any) -> TorchClient:
    torch.manual_seed(context.seed)  # training may differ between runs; the genesis fixes the initial model
    batch = int(context.config.get("batch_size", 32))
    return TorchClient(DigitsCNN(), loader(dirichlet_shard(context), True, batch), momentum_sgd,
                       test_loader=loader(context.test_data(), False, 256))
