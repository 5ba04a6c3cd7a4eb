"""A Flower `NumPyClient` exactly as Flower's PyTorch tutorial writes it, run by flnode unchanged.

Only the model and data are the 8x8 digits instead of CIFAR-10; `FlowerClient`, `train`, `test`,
`get_parameters` and `set_parameters` are the tutorial's. flnode calls `make_client(context)`:

    flnode demo --trainer examples.flower_client.client:make_client
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

try:  # with Flower installed this is Flower's own base class; flnode needs only the duck-typed methods
    from flwr.client import NumPyClient
except ImportError:
    NumPyClient = object  # type: ignore[assignment,misc]

DEVICE = torch.device("cpu")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 2 * 2)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def train(net, trainloader, epochs: int, verbose=False):  # type: ignore[no-untyped-def]
    """Train the network on the training set."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters())
    net.train()
    for epoch in range(epochs):
        correct, total, epoch_loss = 0, 0, 0.0
        for images, labels in trainloader:
            images, labels = images.to(DEVICE), labels.to(DEVICE)
            optimizer.zero_grad()
            outputs = net(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            # Metrics
            epoch_loss += loss
            total += labels.size(0)
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
        epoch_loss /= len(trainloader.dataset)
        epoch_acc = correct / total
        if verbose:
            print(f"Epoch {epoch+1}: train loss {epoch_loss}, accuracy {epoch_acc}")


def test(net, testloader):  # type: ignore[no-untyped-def]
    """Evaluate the network on the entire test set."""
    criterion = torch.nn.CrossEntropyLoss()
    correct, total, loss = 0, 0, 0.0
    net.eval()
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(DEVICE), labels.to(DEVICE)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    loss /= len(testloader.dataset)
    accuracy = correct / total
    return loss, accuracy


def set_parameters(net, parameters: list[np.ndarray]):  # type: ignore[no-untyped-def]
    params_dict = zip(net.state_dict().keys(), parameters)  # noqa: B905 - as the tutorial writes it
    state_dict = OrderedDict({k: torch.Tensor(v) for k, v in params_dict})
    net.load_state_dict(state_dict, strict=True)


def get_parameters(net) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    return [val.cpu().numpy() for _, val in net.state_dict().items()]


class FlowerClient(NumPyClient):
    def __init__(self, net, trainloader, valloader):  # type: ignore[no-untyped-def]
        self.net = net
        self.trainloader = trainloader
        self.valloader = valloader

    def get_parameters(self, config):  # type: ignore[no-untyped-def]
        return get_parameters(self.net)

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        set_parameters(self.net, parameters)
        train(self.net, self.trainloader, epochs=1)
        return get_parameters(self.net), len(self.trainloader), {}

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        set_parameters(self.net, parameters)
        loss, accuracy = test(self.net, self.valloader)
        return float(loss), len(self.valloader), {"accuracy": float(accuracy)}


# ---- the flnode side: build the tutorial's objects from the node's context (its digits shard, the test split)


def _loader(x: np.ndarray, y: np.ndarray, shuffle: bool) -> DataLoader:
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 1, 8, 8))
    return DataLoader(TensorDataset(images, torch.from_numpy(y.astype(np.int64))), batch_size=32, shuffle=shuffle)


def make_client(context):  # type: ignore[no-untyped-def]
    torch.manual_seed(context.seed)
    torch.set_num_threads(1)  # one core per node: the daemon's loop shares the machine
    train_data, test_data = context.train_data(), context.test_data()
    return FlowerClient(Net().to(DEVICE), _loader(train_data.x, train_data.y, True), _loader(test_data.x, test_data.y, False))
