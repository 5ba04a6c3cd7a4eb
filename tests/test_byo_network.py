"""Bring your own model over real node processes on 127.0.0.1.

1. PyTorch: a genesis made from examples/pytorch_cnn; two nodes train with its TorchClient, one with Flower's
   tutorial class (examples/flower_client, unchanged; same architecture, so it fits the genesis). The model reaches
   a stated test accuracy, every node holds the identical model and `chain verify` passes from a directory where
   the training code cannot even be imported: verification re-checks and re-aggregates, it never trains.
2. scikit-learn: SGDClassifier through flnode.adapters.sklearn, the same checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flnode.cli.demo import NodeView, free_ports, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet
from netutil import heights, model_hash_at

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent

if os.environ.get("FLNODE_REQUIRE_TORCH"):
    import sklearn  # noqa: F401
    import torch  # noqa: F401
else:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")


def _accuracy(home: Path, height: int) -> float:
    from flnode.node.chain.store import ChainStore

    store = ChainStore.open(home / "data" / "chain.sqlite", readonly=True)
    try:
        return float((store.get_metrics(height) or {}).get("test_accuracy", 0.0))
    finally:
        store.close()


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainer: str, per_node: dict[int, str], n: int,
         target_acc: float, max_height: int, timeout: float, lr: float = 0.1) -> tuple[list[NodeView], int, float]:
    """Start n nodes, wait until node0's recorded test accuracy reaches target_acc (or max_height); returns the
    views, the height reached by all and node0's accuracy there."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(REPO)  # the trainer reference is resolved against the current directory, as for python -m
    ports = free_ports(n)
    create_testnet(tmp_path, n, chain_id="byo", host="127.0.0.1", listen_host="127.0.0.1", ports=ports,
                   task_rules=_task_and_rules("custom", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, lr, 3000, trainer),
                   force=True)
    views = [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(n)]
    procs = [start_node(v.home, *(("--trainer", per_node[i]) if i in per_node else ())) for i, v in enumerate(views)]
    deadline = time.monotonic() + timeout
    acc, reached = 0.0, 0
    try:
        while time.monotonic() < deadline:
            dead = [i for i, p in enumerate(procs) if p.poll() is not None]
            assert not dead, (views[dead[0]].home / "node.log").read_text()[-2000:]
            reached = min(heights(views))
            if reached >= 2:
                acc = _accuracy(views[0].home, reached - 1)
                if acc >= target_acc or reached >= max_height:
                    break
            time.sleep(0.3)
    finally:
        stop_nodes(procs)
    return views, min(heights(views)), acc


def _verify_without_the_training_code(home: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-m", "flnode.cli.main", "chain", "verify", "--home", str(home)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    probe = subprocess.run([sys.executable, "-c", "import examples.pytorch_cnn.client"], cwd=tmp_path, env=env,
                           capture_output=True)
    assert probe.returncode != 0  # so verification above could not have imported the trainer


def _own_fit_metrics(home: Path) -> list[dict[str, Any]]:
    from flnode.cli.main import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["chain", "show", "--home", str(home), "--json"])
    assert res.exit_code == 0, res.output
    return [b["trainer"] for b in json.loads(res.stdout)["blocks"] if b.get("trainer")]


def test_pytorch_cnn_and_the_unchanged_flower_class_train_one_model(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    flower = "examples.flower_client.client:make_client"
    views, h, acc = _run(tmp_path, monkeypatch, "examples.pytorch_cnn.client:make_client", {1: flower},
                         3, target_acc=0.8, max_height=30, timeout=150)
    assert acc >= 0.8, f"test accuracy {acc} at height {h}"
    assert len({model_hash_at(v.home, h) for v in views}) == 1
    _verify_without_the_training_code(views[0].home, tmp_path)
    fits = _own_fit_metrics(views[0].home)
    assert fits and all("metrics" in f or "error" in f for f in fits)
    assert any(isinstance(f.get("metrics", {}).get("loss"), float) for f in fits)


def test_sklearn_sgd_classifier_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    views, h, acc = _run(tmp_path, monkeypatch, "examples.sklearn_digits.client:make_client", {}, 3,
                         target_acc=0.9, max_height=20, timeout=90)
    assert acc >= 0.9, f"test accuracy {acc} at height {h}"
    assert len({model_hash_at(v.home, h) for v in views}) == 1
    _verify_without_the_training_code(views[0].home, tmp_path)
