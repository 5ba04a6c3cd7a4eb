"""Update compression fixed in genesis: float16, int8 and top-k (with the trainer's error feedback); validators
decode deterministically and aggregate the decoded float32 values; old genesis files load unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flnode.node.app import compression, execute, genesis_state, update_blob_size
from flnode.node.app.compression import encode_update, topk_count
from flnode.node.app.validation import check_update_streamed
from flnode.protocol.errors import DecodeError, GenesisError
from flnode.protocol.genesis import Genesis
from flnode.protocol.tensors import (
    TOPK,
    BytesReader,
    StreamedTensors,
    decode_tensors,
    encode_items,
    tensor_layout,
)
from test_learning import KEYS, _one_update, _reblob, genesis, train_rounds

MODES = ["float16", "int8", "topk"]


def _decode(blob: bytes, mode: str) -> dict[str, np.ndarray]:
    dt = frozenset({compression.COMPRESSION_DTYPES[mode]})
    return StreamedTensors(BytesReader(blob), tensor_layout(blob, dtypes=dt)).decode()


def test_an_old_genesis_file_loads_with_its_hash_and_no_compression() -> None:
    g = genesis()
    d = json.loads(json.dumps(g.to_json_dict()))
    del d["rules"]["compression"], d["rules"]["compression_topk"]
    old = Genesis.from_json_dict(d)
    assert old.rules.compression == "none" and old.hash() == g.hash()
    assert genesis(compression="int8").hash() != g.hash()
    with pytest.raises(GenesisError, match="compression"):
        genesis(compression="zip")


def test_the_decodes_are_the_documented_functions() -> None:
    rng = np.random.default_rng(1)
    delta = {"w": rng.standard_normal((40, 30)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    g16 = genesis(compression="float16")
    d16 = _decode(encode_update(g16, b"a", delta), "float16")
    assert all(np.array_equal(d16[k], delta[k].astype(np.float16).astype(np.float32)) for k in delta)

    g8 = genesis(compression="int8")
    compression.reset()
    d8 = _decode(encode_update(g8, b"a", delta), "int8")
    for k, v in delta.items():
        scale = np.float32(np.abs(v).max() / 127.0)
        assert np.abs(d8[k] - v).max() <= scale / 2 * 1.0001
        assert np.array_equal(d8[k], (np.rint(d8[k] / scale)).astype(np.float32) * scale)

    gk = genesis(compression="topk", compression_topk=0.1)
    compression.reset()
    dk = _decode(encode_update(gk, b"a", delta), "topk")
    for k, v in delta.items():
        keep = topk_count(v.size, 0.1)
        assert np.count_nonzero(dk[k]) == keep
        assert np.abs(v[dk[k] != 0]).min() >= np.abs(v[dk[k] == 0]).max()  # the largest entries
        assert np.array_equal(dk[k][dk[k] != 0], v[dk[k] != 0])  # kept exactly


def test_error_feedback_carries_what_top_k_dropped() -> None:
    rng = np.random.default_rng(2)
    g = genesis(compression="topk", compression_topk=0.05)
    compression.reset()
    deltas = [{"w": rng.standard_normal(2000).astype(np.float32)} for _ in range(4)]
    sent = np.zeros(2000, np.float64)
    for d in deltas:
        sent += _decode(encode_update(g, b"me", d), "topk")["w"]
    carried = compression._residual[b"me"]["w"]
    total = sum(d["w"].astype(np.float64) for d in deltas)
    assert np.allclose(sent + carried, total, atol=1e-5)  # nothing lost: sent + still carried = everything
    compression.reset(b"me")
    assert b"me" not in compression._residual


@pytest.mark.parametrize("mode", MODES)
def test_compressed_updates_have_the_genesis_size_and_execute_on_their_decoded_values(mode: str) -> None:
    g = genesis(compression=mode, compression_topk=0.1)
    compression.reset()
    s0 = genesis_state(g)
    ups = [_one_update(g, s0, k) for k in KEYS[:4]]
    assert {len(b) for _, b in ups} == {update_blob_size(g)} and update_blob_size(g) < update_blob_size(genesis()) / 1.9
    for ann, blob in ups:
        t, why = check_update_streamed(g, s0, ann, blob)
        assert why is None and t is not None
    s1, receipt = execute(g, s0, ups, [])
    assert len(receipt.accepted) == 4
    s1b, _ = execute(g, s0, list(reversed(ups)), [])
    assert s1.model_hash == s1b.model_hash
    # an uncompressed update is not what this chain accepts
    ann, _ = ups[0]
    plain = {k: v for k, v in _decode(ups[0][1], mode).items()}
    from flnode.protocol.tensors import encode_tensors

    bad_ann, bad = _reblob(g, KEYS[0], ann, encode_tensors(plain))
    assert check_update_streamed(g, s0, bad_ann, bad)[1] == "malformed_blob"


def test_top_k_indices_must_increase_within_the_tensor() -> None:
    idx = np.array([3, 1], dtype="<u4")
    vals = np.ones(2, dtype="<f4")
    for i in (idx, np.array([1, 1], "<u4"), np.array([1, 10], "<u4")):
        blob = encode_items([("w", TOPK, [10], [i, vals])])
        with pytest.raises(DecodeError, match="topk"):
            tensor_layout(blob, dtypes=frozenset({TOPK}))
    good = encode_items([("w", TOPK, [10], [np.array([1, 9], "<u4"), np.array([2, -3], "<f4")])])
    dec = StreamedTensors(BytesReader(good), tensor_layout(good, dtypes=frozenset({TOPK}))).decode()
    assert dec["w"].tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 0, -3]
    with pytest.raises(DecodeError):  # a float32-only reader refuses it
        decode_tensors(good)


@pytest.mark.parametrize("mode", MODES)
def test_compressed_training_still_learns_digits(mode: str) -> None:
    compression.reset()
    acc = train_rounds(genesis(compression=mode, compression_topk=0.1), 6)
    assert acc[-1] > 0.6, acc


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_the_exact_blob_size_from_headers_equals_an_encoded_update(model: str) -> None:
    from flnode.node.app import task_for
    from flnode.protocol.tensors import encode_tensors

    g = genesis(model=model)
    zeros = {n: np.zeros(s, np.float32) for n, s in task_for(g.task).param_spec()}
    assert update_blob_size(g) == len(encode_tensors(zeros))
