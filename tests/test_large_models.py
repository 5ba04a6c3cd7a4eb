"""Large models: the streamed codec, one-update-at-a-time validation and chunked aggregation give exactly the bits
of the implementation they replaced. The old functions are copied below (as of commit 53ee4af) as the reference."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import msgpack
import numpy as np
import pytest
from conftest import examples
from flnode.node.app import Reason, WeightedUpdate, aggregate
from flnode.node.app.validation import CHUNK, check_update, check_update_streamed
from flnode.protocol.encoding import expect_bytes, expect_int, expect_list, expect_str, pack, unpack
from flnode.protocol.errors import DecodeError, ProtocolError
from flnode.protocol.genesis import Rules
from flnode.protocol.hashing import digest
from flnode.protocol.tensors import (
    BytesReader,
    StreamedTensors,
    decode_tensors,
    encode_tensors,
    tensor_layout,
    tensors_hash,
    write_tensors,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# ---------------------------------------------------------------- the old implementation (reference)

OLD_MAGIC, OLD_DTYPE = "flnode/tensors/v1", "<f4"


def old_encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    items = []
    for name, arr in tensors.items():
        a = np.asarray(arr, dtype=np.dtype(OLD_DTYPE))
        items.append([name, OLD_DTYPE, [int(d) for d in a.shape], a.tobytes()])
    return pack([OLD_MAGIC, items])


def old_decode_tensors(data: bytes, max_size: int = 1 << 30) -> dict[str, np.ndarray]:
    value = unpack(data, max_size=max_size)
    magic, items = expect_list(value, 2, "tensor blob")
    if magic != OLD_MAGIC:
        raise DecodeError("tensor blob: wrong magic")
    if not isinstance(items, list) or len(items) > 1024:
        raise DecodeError("tensor blob: bad tensor list")
    out: dict[str, np.ndarray] = {}
    for item in items:
        name, dtype, shape, raw = expect_list(item, 4, "tensor")
        name = expect_str(name, "tensor name")
        if name in out:
            raise DecodeError("dup")
        if dtype != OLD_DTYPE:
            raise DecodeError("dtype")
        if not isinstance(shape, list) or len(shape) > 8:
            raise DecodeError("shape")
        dims = [expect_int(d, "dimension", 0, 1 << 31) for d in shape]
        raw = expect_bytes(raw, "tensor data")
        count = 1
        for d in dims:
            count *= d
        if count * 4 != len(raw):
            raise DecodeError("size")
        out[name] = np.frombuffer(raw, dtype=np.dtype(OLD_DTYPE)).reshape(dims).astype(np.float32, copy=True)
    return out


def old_fixed_order_sum_squares(values: np.ndarray) -> float:
    sq = np.square(np.asarray(values).ravel().astype(np.float64))
    pad = (-sq.size) % 4096
    if pad:
        sq = np.concatenate([sq, np.zeros(pad, dtype=np.float64)])
    if sq.size == 0:
        return 0.0
    m = sq.reshape(-1, 4096)
    acc = m[0].copy()
    for row in m[1:]:
        acc += row
    return math.fsum(acc.tolist())


def old_l2(tensors: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(math.fsum(old_fixed_order_sum_squares(t) for t in tensors.values()))


def old_check(spec: list[tuple[str, tuple[int, ...]]], norm_bound: float, max_bytes: int, size: int,
              blob: bytes) -> tuple[dict[str, np.ndarray] | None, str | None]:
    if len(blob) != size:
        return None, "size_mismatch"
    try:
        tensors = old_decode_tensors(blob, max_size=max_bytes)
    except ProtocolError:
        return None, "malformed_blob"
    if [(k, tuple(v.shape)) for k, v in tensors.items()] != spec:
        return None, "wrong_shape"
    if not all(np.isfinite(t).all() for t in tensors.values()):
        return None, "non_finite"
    if old_l2(tensors) > norm_bound:
        return None, "norm_bound"
    return tensors, None


def _old_weighted_mean(updates: Sequence[WeightedUpdate], weights: Sequence[float]) -> dict[str, np.ndarray]:
    total = math.fsum(weights)
    out: dict[str, np.ndarray] = {}
    for name in updates[0].delta:
        acc = np.zeros(updates[0].delta[name].shape, dtype=np.float64)  # type: ignore[union-attr]
        for u, w in zip(updates, weights, strict=True):
            acc += (w / total) * u.delta[name].astype(np.float64)  # type: ignore[union-attr]
        out[name] = acc
    return out


def _old_stack(updates: Sequence[WeightedUpdate], name: str) -> np.ndarray:
    return np.stack([u.delta[name].astype(np.float64) for u in updates])  # type: ignore[union-attr]


def old_combine(rule: str, updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[dict[str, np.ndarray], frozenset[bytes]]:
    ups = sorted(updates, key=lambda u: u.key)
    n = len(ups)
    if rule == "fedavg":
        return _old_weighted_mean(ups, [float(u.num_samples) for u in ups]), frozenset()
    if rule == "median":
        out = {}
        for name in ups[0].delta:
            s = np.sort(_old_stack(ups, name), axis=0, kind="stable")
            out[name] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * 0.5
        return out, frozenset()
    if rule == "trimmed_mean":
        k = min(int(math.floor(rules.trim_fraction * n)), (n - 1) // 2)
        out = {}
        for name in ups[0].delta:
            s = np.sort(_old_stack(ups, name), axis=0, kind="stable")
            acc = np.zeros(s.shape[1:], dtype=np.float64)
            for row in s[k : n - k]:
                acc += row
            out[name] = acc / (n - 2 * k)
        return out, frozenset()
    f = rules.krum_byzantine
    m = rules.krum_select or max(1, n - f)
    if n <= 2 * f + 2 or m >= n:
        return old_combine("fedavg", ups, rules)[0], frozenset()
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            a, b = ups[i].delta, ups[j].delta
            dist[i][j] = dist[j][i] = math.fsum(
                old_fixed_order_sum_squares(a[x].astype(np.float64) - b[x].astype(np.float64)) for x in a)  # type: ignore[union-attr,index]
    k = n - f - 2
    scores = []
    for i in range(n):
        near = sorted(dist[i][j] for j in range(n) if j != i)[:k]
        scores.append((math.fsum(near), ups[i].key, i))
    scores.sort()
    keep = sorted(i for _, _, i in scores[:m])
    chosen = [ups[i] for i in keep]
    outliers = frozenset(ups[i].author for i in range(n) if i not in keep)
    return _old_weighted_mean(chosen, [float(u.num_samples) for u in chosen]), outliers


def old_aggregate(base: dict[str, np.ndarray], updates: Sequence[WeightedUpdate], rules: Rules) -> tuple[dict[str, np.ndarray], frozenset[bytes]]:
    if not updates:
        return {k: v.copy() for k, v in base.items()}, frozenset()
    multiple = rules.weight_median_multiple
    declared = [u.num_samples for u in updates]
    if multiple > 0:
        cap = multiple * sorted(declared)[(len(declared) - 1) // 2]
        declared = [min(d, cap) for d in declared]
    updates = [replace(u, num_samples=w) for u, w in zip(updates, declared, strict=True)]
    delta, outliers = old_combine(rules.aggregator, updates, rules)
    lr = float(rules.server_lr)
    return {k: (base[k].astype(np.float64) + lr * delta[k]).astype(np.float32) for k in base}, outliers


# ---------------------------------------------------------------- fixtures

# A tensor longer than one chunk with a ragged tail, one shorter than a 4096 row, a 0-d one and an empty one.
SPEC = [("w1", (3, CHUNK // 2 + 4097)), ("b1", (5000,)), ("s", ()), ("e", (0, 3)), ("w2", (17, 13))]


def _model(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SPEC}


def _updates(seed: int, n: int, *, streamed: bool) -> list[WeightedUpdate]:
    rng = np.random.default_rng(seed)
    out = []
    first: dict[str, np.ndarray] = {}
    for i in range(n):
        delta = _model(rng, float(rng.uniform(0.01, 2)))
        first = first or delta
        if i == 1 and n > 2:  # ties and signed zeros: stable sort order and -0.0 handling must agree
            delta["w2"][:] = -0.0
            delta["b1"][:100] = first["b1"][:100]
        d: dict[str, np.ndarray] | StreamedTensors = delta
        if streamed:
            blob = encode_tensors(delta)
            d = StreamedTensors(BytesReader(blob), tensor_layout(blob))
        out.append(WeightedUpdate(digest(b"%d/%d" % (seed, i)), bytes([i]) * 32, d, int(rng.integers(1, 500))))
    return out


def _same(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                      a[k].tobytes() == b[k].tobytes() for k in a)


# ---------------------------------------------------------------- aggregation: bit-identical to the old one


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed_mean", "multi_krum"])
@pytest.mark.parametrize("n", [1, 2, 4, 5, 7])
def test_streamed_aggregation_is_bit_identical_to_the_old_one(rule: str, n: int) -> None:
    for seed in range(2):
        rules = Rules(aggregator=rule, trim_fraction=0.25, krum_byzantine=1, server_lr=0.7,
                      weight_median_multiple=seed * 2)
        base = _model(np.random.default_rng(100 + seed))
        want, want_out = old_aggregate(base, _updates(seed, n, streamed=False), rules)
        for streamed in (False, True):
            got = aggregate(base, _updates(seed, n, streamed=streamed), rules)
            assert _same(got.new_model, want), (rule, n, streamed)
            assert got.outliers == want_out
            assert tensors_hash(got.new_model) == digest(old_encode_tensors(want))


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_centered_clip_streamed_and_chunked_is_bit_identical(n: int) -> None:
    """No old implementation to compare with: streamed blobs and decoded arrays (tensors over several chunks,
    ragged tails, 0-d and empty) give the same bits, and so does every arrival order."""
    rules = Rules(aggregator="centered_clip", server_lr=0.7)
    base = _model(np.random.default_rng(7))
    want = aggregate(base, _updates(3, n, streamed=False), rules)
    got = aggregate(base, list(reversed(_updates(3, n, streamed=True))), rules)
    assert _same(got.new_model, want.new_model) and not got.outliers


def test_multi_krum_still_excludes_and_agrees_when_an_outlier_is_present() -> None:
    ups = _updates(9, 6, streamed=False)
    bad = {k: v * 0 + 50.0 for k, v in ups[2].delta.items()}  # type: ignore[union-attr]
    ups[2] = replace(ups[2], delta=bad)
    rules = Rules(aggregator="multi_krum", krum_byzantine=1)
    base = _model(np.random.default_rng(1))
    want, want_out = old_aggregate(base, ups, rules)
    streamed = [replace(u, delta=StreamedTensors(BytesReader(b := encode_tensors(u.delta)), tensor_layout(b)))  # type: ignore[arg-type]
                for u in ups]
    got = aggregate(base, streamed, rules)
    assert ups[2].author in got.outliers and got.outliers == want_out
    assert _same(got.new_model, want)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 8),
       rule=st.sampled_from(["fedavg", "median", "trimmed_mean", "multi_krum"]))
@settings(max_examples=examples(25), deadline=None, suppress_health_check=list(HealthCheck))
def test_random_small_models_agree(seed: int, n: int, rule: str) -> None:
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(0, 9000)),)] + [tuple(int(x) for x in rng.integers(0, 7, size=int(rng.integers(0, 3))))
                                                for _ in range(2)]
    base = {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    ups = [WeightedUpdate(digest(b"%d" % i), bytes([i]) * 32,
                          {k: (rng.standard_normal(v.shape) * 3).astype(np.float32) for k, v in base.items()},
                          int(rng.integers(1, 50))) for i in range(n)]
    rules = Rules(aggregator=rule, krum_byzantine=int(rng.integers(0, 3)))
    want, want_out = old_aggregate(base, ups, rules)
    streamed = [replace(u, delta=StreamedTensors(BytesReader(b := encode_tensors(u.delta)), tensor_layout(b)))  # type: ignore[arg-type]
                for u in ups]
    got = aggregate(base, streamed, rules)
    assert _same(got.new_model, want) and got.outliers == want_out


# ---------------------------------------------------------------- validation: same reasons, same norm


def _check_both(blob: bytes, size: int | None = None, norm_bound: float = 1e9) -> tuple[str | None, str | None]:
    from types import SimpleNamespace

    from flnode.node.app import validation

    size = len(blob) if size is None else size
    g = SimpleNamespace(rules=Rules(max_blob_bytes=64 << 20, norm_bound=norm_bound))
    ann = SimpleNamespace(blob_size=size)
    orig = validation.param_spec
    validation.param_spec = lambda _g: list(SPEC)  # type: ignore[assignment]
    try:
        new_t, new_r = check_update_streamed(g, None, ann, blob)  # type: ignore[arg-type]
        dec_t, dec_r = check_update(g, None, ann, blob)  # type: ignore[arg-type]
    finally:
        validation.param_spec = orig  # type: ignore[assignment]
    old_t, old_r = old_check(list(SPEC), norm_bound, 64 << 20, size, blob)
    assert (new_r, dec_r) == (old_r, old_r)
    assert (new_t is None) == (old_t is None)
    if old_t is not None:
        assert dec_t is not None and _same(dec_t, old_t)
    return new_r, old_r


def test_validation_reasons_match_the_old_checks() -> None:
    rng = np.random.default_rng(4)
    good = _model(rng)
    blob = encode_tensors(good)
    assert _check_both(blob) == (None, None)
    assert _check_both(blob, size=len(blob) + 1)[0] == "size_mismatch"
    assert _check_both(blob[:-1] + b"\x00\x00", size=len(blob) + 1)[0] == "malformed_blob"
    for k, v in (("w1", np.nan), ("b1", np.inf), ("w2", -np.inf)):
        bad = {n: a.copy() for n, a in good.items()}
        bad[k].reshape(-1)[-1] = v
        assert _check_both(encode_tensors(bad))[0] == "non_finite"
    norm = old_l2(good)
    assert _check_both(blob, norm_bound=norm)[0] is None
    assert _check_both(blob, norm_bound=math.nextafter(norm, 0))[0] == "norm_bound"
    swapped = dict(reversed(list(good.items())))
    assert _check_both(encode_tensors(swapped))[0] == "wrong_shape"
    assert _check_both(encode_tensors({**good, "w2": np.zeros((13, 17), np.float32)}))[0] == "wrong_shape"
    assert Reason.MALFORMED_BLOB == "malformed_blob"


def test_chunked_norm_equals_the_whole_array_norm() -> None:
    from flnode.node.app.validation import l2_norm_exact, scan_update

    rng = np.random.default_rng(8)
    for _ in range(5):
        t = _model(rng, float(rng.uniform(1e-3, 1e3)))
        blob = encode_tensors(t)
        finite, norm = scan_update(StreamedTensors(BytesReader(blob), tensor_layout(blob)))
        assert finite and norm == old_l2(t) == l2_norm_exact(t)


# ---------------------------------------------------------------- codec: same bytes, same acceptance


def test_encoding_is_byte_identical_and_streams() -> None:
    rng = np.random.default_rng(2)
    cases: list[dict[str, np.ndarray]] = [_model(rng), {}, {"a": np.asarray(np.float32(3.0))}, {"x" * 40: rng.standard_normal((70, 3))},  # float64 input
              {"f": np.asfortranarray(rng.standard_normal((30, 20)).astype(np.float32))},
              {"big": np.zeros(70_000, np.float32), "é": np.ones((2, 2, 2), np.float32)}]
    for t in cases:
        want = old_encode_tensors(t)
        assert encode_tensors(t) == want
        assert tensors_hash(t) == digest(want)
        parts: list[bytes] = []
        write_tensors(t, lambda b, parts=parts: parts.append(bytes(b)))  # type: ignore[misc]
        assert b"".join(parts) == want
        assert _same(decode_tensors(want), old_decode_tensors(want))


def _accepts(f, blob: bytes) -> bool:  # type: ignore[no-untyped-def]
    try:
        f(blob)
        return True
    except ProtocolError:
        return False


@given(seed=st.integers(0, 1 << 30), edits=st.integers(1, 3))
@settings(max_examples=examples(300), deadline=None, suppress_health_check=list(HealthCheck))
def test_the_header_parser_accepts_exactly_what_the_old_decoder_accepts(seed: int, edits: int) -> None:
    rng = np.random.default_rng(seed)
    t = {f"n{i}": rng.standard_normal(tuple(int(x) for x in rng.integers(0, 5, size=int(rng.integers(0, 3)))))
         for i in range(int(rng.integers(0, 4)))}
    blob = bytearray(old_encode_tensors(t))
    for _ in range(edits):
        what = int(rng.integers(0, 4))
        if what == 0 and blob:  # flip a byte, mostly in headers
            i = int(rng.integers(0, min(len(blob), 64)))
            blob[i] = int(rng.integers(0, 256))
        elif what == 1 and blob:
            del blob[int(rng.integers(0, len(blob))):]
        elif what == 2:
            blob += bytes(rng.integers(0, 256, size=int(rng.integers(1, 4)), dtype=np.uint8))
        else:
            i = int(rng.integers(0, len(blob) + 1))
            blob[i:i] = bytes(rng.integers(0, 256, size=1, dtype=np.uint8))
    b = bytes(blob)
    assert _accepts(tensor_layout, b) == _accepts(old_decode_tensors, b)


def test_non_canonical_and_foreign_spellings_are_refused_like_before() -> None:
    raw = np.arange(3, dtype="<f4").tobytes()
    cases = [
        # array16 header for a 2-element array (not minimal)
        b"\xdc\x00\x02" + pack(OLD_MAGIC) + pack([]),
        # the raw data as a str instead of bin
        pack([OLD_MAGIC, [["w", "<f4", [3]]]])[:-1] + b"",
        msgpack.packb([OLD_MAGIC, [["w", "<f4", [3], raw.decode("latin-1")]]]),
        # a uint16 dimension where a fixint suffices
        pack([OLD_MAGIC, [["w", "<f4", [3], raw]]]).replace(b"\x91\x03", b"\x91\xcd\x00\x03"),
        pack([OLD_MAGIC, [["w", "<f8", [3], raw]]]),
        pack([OLD_MAGIC, [["w", "<f4", [3], raw], ["w", "<f4", [3], raw]]]),
        pack([OLD_MAGIC, [["w" * 257, "<f4", [3], raw]]]),
        pack([OLD_MAGIC, [["w", "<f4", [1, 1, 1, 1, 1, 1, 1, 1, 3], raw]]]),
        pack([OLD_MAGIC, [["w", "<f4", [-3], raw]]]),
        pack([OLD_MAGIC, [["w", "<f4", [True], raw[:4]]]]),
        pack([OLD_MAGIC, [["w", "<f4", [3], raw]], 1]),
        pack(["flnode/tensors/v2", []]),
    ]
    good = pack([OLD_MAGIC, [["w" * 256, "<f4", [3], raw]]])
    assert _accepts(tensor_layout, good) and _accepts(old_decode_tensors, good)
    for c in cases:
        assert not _accepts(old_decode_tensors, c)
        assert not _accepts(tensor_layout, c)
