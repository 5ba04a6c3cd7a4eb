"""flnode model export / evaluate and flnode.load_model: the committed model of any height, checked against the
chain, reloaded bit-exactly in NumPy, safetensors and PyTorch; a tampered model blob is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from flnode.cli.main import app
from flnode.node.chain.store import ChainStore
from flnode.node.export import ExportError, read_model
from flnode.protocol.genesis import Genesis
from flnode.protocol.tensors import decode_tensors
from test_chain import home_with_chain, make_chain
from typer.testing import CliRunner

from flnode import load_model


def client_home(tmp_path: Path, trainer: str) -> tuple[Path, Genesis]:
    """A home (genesis, config, no chain yet) of a 4-validator network training a client-defined model."""
    from flnode.cli.node_cmd import make_genesis
    from flnode.node.config import NodeConfig, write_config
    from flnode.protocol.crypto import NodeKey

    keys = [NodeKey(bytes([i + 90]) * 32) for i in range(4)]
    g = make_genesis("client", [(f"n{i}", k.public_key) for i, k in enumerate(keys)],
                     {"model": "custom", "trainer": trainer}, {})
    home = tmp_path / "home"
    home.mkdir()
    g.save(home / "genesis.json")
    write_config(home, NodeConfig())
    return home, g


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g, blocks, blobs = make_chain(3)
    return home_with_chain(tmp_path_factory.mktemp("export") / "home", g, blocks, blobs)


def on_chain(home: Path, height: int) -> dict[str, np.ndarray]:
    store = ChainStore.open(home / "data" / "chain.sqlite", readonly=True)
    try:
        return dict(store.get_state(height).model)
    finally:
        store.close()


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype == np.float32 and a[k].shape == b[k].shape
                                      and a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_export_each_height_and_reload_bit_exactly(home: Path, tmp_path: Path, suffix: str) -> None:
    if suffix == ".pt" and not os.environ.get("FLNODE_REQUIRE_TORCH"):
        pytest.importorskip("torch")
    runner = CliRunner()
    for height in (None, 1, 0):
        out = tmp_path / f"m{height}{suffix}"
        args = ["model", "export", "--home", str(home), "--out", str(out)]
        res = runner.invoke(app, args + ([] if height is None else ["--height", str(height)]))
        h = 3 if height is None else height
        assert res.exit_code == 0, res.output
        want = on_chain(home, h) if h else load_model(home, 0)
        assert f"height {h}: model " in res.output and "checked against the chain" in res.output
        assert same(read_model(out), want)
    assert same(load_model(home), on_chain(home, 3)) and not same(load_model(home, 1), on_chain(home, 3))


def test_refusals_name_the_problem(home: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["model", "export", "--home", str(home), "--height", "9", "--out", str(tmp_path / "x.npz")])
    assert res.exit_code == 2 and "height 9 is not committed here (the tip is 3)" in res.output
    res = runner.invoke(app, ["model", "export", "--home", str(home), "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "unknown format '.onnx'" in res.output
    assert not (tmp_path / "x.npz").exists()


def test_a_tampered_model_blob_is_refused(tmp_path: Path) -> None:
    g, blocks, blobs = make_chain(2)
    home = home_with_chain(tmp_path / "home", g, blocks, blobs)
    store = ChainStore.open(home / "data" / "chain.sqlite", readonly=True)
    path = store.blobs.files.path(blocks[1][0].header.model_hash)
    store.close()
    model = decode_tensors(path.read_bytes())
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of the last parameter
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="height 2: .*corrupt"):
        load_model(home, 2)
    assert same(load_model(home, 1), dict(blocks[0][2].model)) and model  # other heights still export


def test_evaluate_the_chain_model_and_an_exported_file(home: Path, tmp_path: Path) -> None:
    from flnode.node.app import load_dataset
    from flnode.protocol.genesis import Genesis

    runner = CliRunner()
    g = Genesis.load(home / "genesis.json")
    _, test = load_dataset(g.task)
    data = tmp_path / "test.npz"
    np.savez(data, x=test.x, y=test.y)
    res = runner.invoke(app, ["model", "evaluate", "--home", str(home), "--data", str(data)])
    assert res.exit_code == 0, res.output
    acc3 = float(res.output.split("accuracy ")[1].split(",")[0])
    res0 = runner.invoke(app, ["model", "evaluate", "--home", str(home), "--height", "0"])
    acc0 = float(res0.output.split("accuracy ")[1].split(",")[0])
    assert 0.5 < acc3 <= 1.0 and acc0 < acc3  # three rounds of digits learn something
    out = tmp_path / "m.safetensors"
    assert runner.invoke(app, ["model", "export", "--home", str(home), "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["model", "evaluate", "--home", str(home), "--model", str(out), "--data", str(data)])
    assert res.exit_code == 0 and f"accuracy {acc3:.4f}" in res.output


def test_the_pytorch_example_loads_the_exported_state_dict(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch") if not os.environ.get("FLNODE_REQUIRE_TORCH") else __import__("torch")

    from examples.pytorch_cnn.client import DigitsCNN

    home, g = client_home(tmp_path, "examples.pytorch_cnn.client:make_client")
    out = tmp_path / "cnn.pt"
    res = CliRunner().invoke(app, ["model", "export", "--home", str(home), "--out", str(out)])
    assert res.exit_code == 0, res.output
    net = DigitsCNN()
    net.load_state_dict(torch.load(out, weights_only=True))  # strict: every entry, right names and shapes
    want = load_model(home)
    assert all(np.array_equal(net.state_dict()[k].numpy(), v) for k, v in want.items())


def test_a_pruned_model_blob_is_a_clear_error(tmp_path: Path) -> None:
    g, blocks, blobs = make_chain(2)
    home = home_with_chain(tmp_path / "home", g, blocks, blobs)
    store = ChainStore.open(home / "data" / "chain.sqlite", readonly=True)
    store.blobs.files.path(blocks[0][0].header.model_hash).unlink()
    store.close()
    res = CliRunner().invoke(app, ["model", "export", "--home", str(home), "--height", "1", "--out", str(tmp_path / "m.npz")])
    assert res.exit_code == 2 and "height 1: model blob" in res.output and "not kept here" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "m.npz").exists()


def test_a_client_model_is_scored_on_the_given_data(tmp_path: Path) -> None:
    """A client-defined model (the sklearn example) is evaluated by its own client, on --data, not its test split."""
    pytest.importorskip("sklearn") if not os.environ.get("FLNODE_REQUIRE_TORCH") else __import__("sklearn")
    from flnode.node.app import load_dataset

    home, g = client_home(tmp_path, "examples.sklearn_digits.client:make_client")
    _, test = load_dataset(g.task)
    runner = CliRunner()
    split = runner.invoke(app, ["model", "evaluate", "--home", str(home)])
    assert split.exit_code == 0, split.output
    data = tmp_path / "ones.npz"
    np.savez(data, x=np.zeros_like(test.x[:40]), y=np.full(40, 3))  # one input, one label: accuracy is 0 or 1
    res = runner.invoke(app, ["model", "evaluate", "--home", str(home), "--data", str(data)])
    assert res.exit_code == 0, res.output
    acc = float(res.output.split("accuracy ")[1].split(",")[0])
    assert acc in (0.0, 1.0) and f"on {data}" in res.output
