"""The committed global model of a height, checked against the chain, as arrays or as a file a user's code loads.

A model leaves the node only after its hash matches what the chain committed for that height: the block header's
model hash (the genesis' initial model hash at height 0) and the stored state's. The formats: `.npz` (NumPy),
`.safetensors` and, with PyTorch installed, a `state_dict` `.pt`. Names, shapes and order are the genesis task's;
every tensor is float32, as on the chain.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flnode.protocol.genesis import Genesis
from flnode.protocol.tensors import Tensors, decode_tensors, tensors_hash

if TYPE_CHECKING:
    from flnode.node.app.data import Dataset

FORMATS = (".npz", ".safetensors", ".pt")


class ExportError(Exception):
    """The model cannot be read or does not match the chain; the message is one line."""


@dataclass(frozen=True)
class CommittedModel:
    height: int
    model_hash: bytes
    tensors: Tensors  # name -> float32 array, in the genesis task's order


def open_home(home: Path) -> tuple[Genesis, Path]:
    from flnode.node.config import home_paths, load_config

    home = Path(home).expanduser()
    if not home.is_dir():
        raise ExportError(f"home {home} does not exist")
    paths = home_paths(home, load_config(home, {}, os.environ).config)
    if not paths.genesis.exists():
        raise ExportError(f"{paths.genesis} does not exist: not a node home")
    return Genesis.load(paths.genesis), paths.chain_db


def committed_model(home: Path, height: int | None = None) -> CommittedModel:
    """The global model after `height` (default: the tip), its hash checked against the chain."""
    from flnode.node.app import genesis_state
    from flnode.node.chain.store import ChainStore, StoreError

    genesis, db = open_home(home)
    if not db.exists():
        tip = 0
        store = None
    else:
        store = ChainStore.open(db, readonly=True)
        tip = store.latest_height()
    try:
        h = tip if height is None else height
        if not 0 <= h <= tip:
            raise ExportError(f"height {h} is not committed here (the tip is {tip})")
        if h == 0:
            model = genesis_state(genesis).model
            committed = bytes.fromhex(genesis.initial_model_hash)
        else:
            assert store is not None
            block, row = store.get_block(h), store.state_row(h)
            if block is None or row is None:
                raise ExportError(f"height {h}: no block or state stored")
            committed = block.header.model_hash
            if row[0] != committed:
                raise ExportError(f"height {h}: the stored state names model {row[0].hex()[:16]}, "
                                  f"the block {committed.hex()[:16]}")
            blob = store.blobs.get(committed)  # None also for a file whose content does not hash to its name
            if blob is None and store.blobs.has(committed):
                raise ExportError(f"height {h}: model blob {committed.hex()[:16]} does not hash to its name: "
                                  "it is corrupt")
            if blob is None:
                raise ExportError(f"height {h}: model blob {committed.hex()[:16]} is not kept here (pruned)")
            model = decode_tensors(blob)
    except StoreError as exc:
        raise ExportError(str(exc)) from None
    finally:
        if store is not None:
            store.close()
    actual = tensors_hash(model)
    if actual != committed:
        raise ExportError(f"height {h}: the model here hashes to {actual.hex()[:16]}, the chain committed "
                          f"{committed.hex()[:16]}: the blob is corrupt")
    return CommittedModel(h, committed, model)


def load_model(home: str | Path, height: int | None = None) -> dict[str, np.ndarray]:
    """The committed global model of `height` (default: the tip) as name -> float32 array."""
    return {k: np.array(v) for k, v in committed_model(Path(home), height).tensors.items()}


def write_model(tensors: Tensors, out: Path) -> None:
    """Write by suffix: .npz, .safetensors or .pt (a torch state_dict of the federated entries)."""
    suffix = out.suffix.lower()
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    tmp = out.with_name(out.name + ".tmp")
    if suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(tmp), metadata={"order": json.dumps(list(arrays))})  # the format sorts by name
    elif suffix == ".pt":
        try:
            import torch
        except ImportError:
            raise ExportError("writing .pt needs PyTorch (pip install 'flnode[torch]')") from None
        torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, tmp)
    else:
        raise ExportError(f"unknown format {out.suffix!r}: use one of {', '.join(FORMATS)}")
    os.replace(tmp, out)


def read_model(path: Path) -> dict[str, np.ndarray]:
    """A model file written by write_model (or anyone else in those formats)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path) as f:
                return {k: np.asarray(f[k]) for k in f.files}
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                names = list(f.keys())
                order = json.loads((f.metadata() or {}).get("order", "[]"))
                if sorted(order) == sorted(names):
                    names = order
                return {k: f.get_tensor(k) for k in names}
        if suffix == ".pt":
            import torch

            return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None
    raise ExportError(f"unknown format {path.suffix!r}: use one of {', '.join(FORMATS)}")


def evaluate_model(genesis: Genesis, tensors: dict[str, np.ndarray], data: Path | None = None) -> dict[str, float]:
    """Accuracy and loss on `data` (.npz with x, y; default the task's held-out test split): the built-in task's
    own evaluation, or for a client-defined model its client's, given `data` as its data file."""
    from flnode.node.app import load_dataset, load_npz, make_task
    from flnode.node.app.limits import param_spec

    spec = param_spec(genesis)
    missing = [n for n, _ in spec if n not in tensors]
    wrong = [n for n, s in spec if n in tensors and tuple(tensors[n].shape) != tuple(s)]
    if missing or wrong:
        raise ExportError(f"the model does not fit the genesis task: missing {missing[:3]}, wrong shape {wrong[:3]}")
    model = {n: np.asarray(tensors[n], dtype=np.float32) for n, _ in spec}
    try:
        test = load_npz(data) if data is not None else load_dataset(genesis.task)[1]
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if genesis.task.params:  # a participant-supplied model: only its client knows how to run it
        return _client_scores(genesis, model, test)
    task = make_task(genesis.task, test.x.shape[1], test.n_classes)
    try:
        m = task.evaluate(model, test)
    except ValueError as exc:
        raise ExportError(f"{data} does not fit the model: {exc}") from None
    return {"accuracy": float(m.accuracy), "loss": float(m.loss)}


def _client_scores(genesis: Genesis, model: Tensors, test: Dataset) -> dict[str, float]:
    """A client-defined model scored by its own client (Participant.evaluate, as the node does for its metrics).
    Clients evaluate on ClientContext.test_data(), so the context hands them `test`: a data file given as the
    node's data_path would only change what they train on."""
    from dataclasses import dataclass

    from flnode.node.app.participant import Participant
    from flnode.node.app.tasks import ClientContext, builtin_or_loaded

    @dataclass(frozen=True)
    class EvalContext(ClientContext):
        def test_data(self) -> Dataset:
            return test

    t = genesis.task
    ctx = EvalContext(t, 0, len(genesis.validators), None, {"learning_rate": t.learning_rate,
                      "local_epochs": t.local_epochs, "batch_size": t.batch_size, "dataset": t.dataset})
    try:
        scores = Participant(genesis, builtin_or_loaded(t, ctx), 0).evaluate(model)
    except Exception as exc:  # noqa: BLE001 - user code (import, factory, evaluate): one line, no traceback
        lines = str(exc).strip().splitlines()
        raise ExportError(f"{t.trainer}: {type(exc).__name__}: {lines[-1] if lines else ''}") from None
    return {"accuracy": scores["test_accuracy"], "loss": scores["test_loss"]}
