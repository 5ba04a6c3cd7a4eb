"""protocol/: canonical encoding, signatures with domain separation, tensors, messages, genesis, and bad input.

Every decoder gets random and mutated bytes: only a ProtocolError may come out.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import examples
from flnode.protocol.crypto import NodeKey, verify
from flnode.protocol.encoding import pack, unpack
from flnode.protocol.errors import DecodeError, GenesisError, OversizeError, ProtocolError, ValidationError
from flnode.protocol.genesis import Genesis, Rules, TaskSpec, ValidatorInfo
from flnode.protocol.hashing import digest
from flnode.protocol.messages import (
    Block,
    BlockHeader,
    BlockResponse,
    CommitCertificate,
    DuplicateVoteEvidence,
    Proposal,
    UpdateAnnouncement,
    UpdateBundle,
    Vote,
    VoteType,
    decode_gossip,
    empty_commit_hash,
    encode_gossip,
    list_hash,
)
from flnode.protocol.tensors import decode_tensors, encode_tensors, tensors_hash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FAST = settings(max_examples=examples(150), deadline=None, suppress_health_check=list(HealthCheck))
KEYS = [NodeKey(bytes([i + 1]) * 32) for i in range(4)]
CHAIN = "test-chain"
H = digest(b"h")


def sample_vote(k: NodeKey = KEYS[0], bh: bytes | None = H) -> Vote:
    return Vote(VoteType.PREVOTE, 3, 1, bh, k.public_key).signed(k, CHAIN)


def sample_update(k: NodeKey = KEYS[0]) -> UpdateAnnouncement:
    return UpdateAnnouncement(2, H, digest(b"blob"), 4, 100, 123, 900_000, k.public_key).signed(k, CHAIN)


def sample_block() -> Block:
    ups = (sample_update(KEYS[0]), sample_update(KEYS[1]))
    ev = (DuplicateVoteEvidence.of(sample_vote(KEYS[2], H), sample_vote(KEYS[2], None)),)
    cert = sample_cert()
    hdr = BlockHeader(CHAIN, 2, H, KEYS[0].public_key, 5, list_hash(ups), list_hash(ev), cert.hash(), H, H)
    return Block(hdr, ups, ev, cert)


def sample_cert(n: int = 3) -> CommitCertificate:
    sigs = []
    for k in KEYS[:n]:
        v = Vote(VoteType.PRECOMMIT, 1, 0, H, k.public_key).signed(k, CHAIN)
        sigs.append((k.public_key, v.signature))
    return CommitCertificate(1, 0, H, tuple(sorted(sigs)))


def sample_proposal() -> Proposal:
    return Proposal(2, 0, -1, sample_block(), KEYS[0].public_key).signed(KEYS[0], CHAIN)


SAMPLES: dict[str, tuple[Callable[[bytes], Any], bytes]] = {
    "vote": (Vote.decode, sample_vote().encode()),
    "update": (UpdateAnnouncement.decode, sample_update().encode()),
    "cert": (CommitCertificate.decode, sample_cert().encode()),
    "block": (Block.decode, sample_block().encode()),
    "proposal": (Proposal.decode, sample_proposal().encode()),
    "block_response": (BlockResponse.decode, BlockResponse(((sample_block(), sample_cert()),)).encode()),
    "gossip": (decode_gossip, encode_gossip(sample_vote())),
    "bundle": (decode_gossip, encode_gossip(UpdateBundle(
        replace(sample_update(), blob_hash=digest(b"abcd")).signed(KEYS[0], CHAIN), b"abcd"))),
    "tensors": (decode_tensors, encode_tensors({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})),
}


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    "bad",
    [
        msgpack.packb({"a": 1}),  # maps are not canonical data
        msgpack.packb(1.5),  # floats are not allowed
        b"\xcd\x00\x01",  # uint16 holding 1: a non-minimal integer
        b"\xd9\x01a",  # str8 for a 1-char string: non-minimal
        msgpack.packb([1, 2]) + b"\x00",  # trailing bytes
        b"\xc7\x01\x01x",  # ext type
        b"",
    ],
)
def test_unpack_refuses_non_canonical(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack(bad)


def test_unpack_size_and_depth_caps() -> None:
    with pytest.raises(OversizeError):
        unpack(pack([b"x" * 100]), max_size=50)
    deep: list[Any] = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(DecodeError):
        unpack(msgpack.packb(deep))


@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40)
                    | st.text(max_size=20), lambda c: st.lists(c, max_size=5), max_leaves=20))
@FAST
def test_pack_unpack_round_trip(value: Any) -> None:
    data = pack(value)
    assert pack(unpack(data)) == data


# ---------------------------------------------------------------- fuzz every decoder


@pytest.mark.parametrize("name", sorted(SAMPLES))
@given(data=st.data())
@FAST
def test_decoders_raise_only_protocol_errors(name: str, data: st.DataObject) -> None:
    decode, good = SAMPLES[name]
    how = data.draw(st.sampled_from(["random", "flip", "truncate", "extend", "splice"]))
    if how == "random":
        blob = data.draw(st.binary(max_size=400))
    elif how == "flip":
        b = bytearray(good)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        blob = bytes(b)
    elif how == "truncate":
        blob = good[: data.draw(st.integers(0, len(good) - 1))]
    elif how == "extend":
        blob = good + data.draw(st.binary(min_size=1, max_size=20))
    else:
        i = data.draw(st.integers(0, len(good)))
        blob = good[:i] + data.draw(st.binary(max_size=30)) + good[i:]
    try:
        decode(blob)
    except ProtocolError:
        pass


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_decoders_round_trip(name: str) -> None:
    decode, good = SAMPLES[name]
    value = decode(good)
    if name != "tensors":
        assert (value.encode() if name not in ("gossip", "bundle") else encode_gossip(value)) == good


@pytest.mark.parametrize(
    "value",
    [
        [3, 1, 0, H, KEYS[0].public_key, b"s" * 64],  # vote type 3
        [1, -1, 0, H, KEYS[0].public_key, b"s" * 64],  # negative height
        [1, 1, 0, H[:31], KEYS[0].public_key, b"s" * 64],  # 31-byte hash
        [True, 1, 0, H, KEYS[0].public_key, b"s" * 64],  # bool for int
        [1, 1, 0, H, KEYS[0].public_key, b"s" * 63],  # short signature
        [1, 1, 0, "text", KEYS[0].public_key, b"s" * 64],  # str for bytes
    ],
)
def test_wrongly_typed_fields_are_refused(value: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        Vote.decode(msgpack.packb(value, use_bin_type=True))


# ---------------------------------------------------------------- signatures


def test_signature_domain_separation() -> None:
    v = sample_vote()
    assert v.verify(CHAIN)
    assert not v.verify("other-chain")
    assert not replace(v, round=2).verify(CHAIN)
    assert not replace(v, block_hash=None).verify(CHAIN)
    assert not replace(v, validator=KEYS[1].public_key).verify(CHAIN)
    assert not replace(v, signature=v.signature[:-1] + bytes([v.signature[-1] ^ 1])).verify(CHAIN)
    # the same payload signed as a vote is not a valid update (or proposal) signature
    assert verify(v.validator, CHAIN, "vote", v.sign_payload(), v.signature)
    assert not verify(v.validator, CHAIN, "update", v.sign_payload(), v.signature)
    assert not verify(v.validator, CHAIN, "proposal", v.sign_payload(), v.signature)
    assert not verify(v.validator, CHAIN, "vote", v.sign_payload(), v.signature[:32])
    u = sample_update()
    assert u.verify(CHAIN) and not replace(u, num_samples=101).verify(CHAIN)
    p = sample_proposal()
    assert p.verify(CHAIN) and not replace(p, pol_round=0).verify(CHAIN)


def test_node_key_file(tmp_path: Path) -> None:
    k = NodeKey.generate()
    path = tmp_path / "k" / "node_key.json"
    k.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert NodeKey.load(path) == k
    path.write_text("{broken")
    with pytest.raises(DecodeError):
        NodeKey.load(path)
    path.write_text(json.dumps({"seed": k.seed.hex(), "public_key": "00" * 32}))
    with pytest.raises(DecodeError, match="does not match"):
        NodeKey.load(path)


def test_peer_id_comes_from_the_same_key() -> None:
    from libp2p.identity_utils import create_identity_from_seed

    k = NodeKey.generate()
    assert create_identity_from_seed(k.seed).public_key.to_bytes() == k.public_key


# ---------------------------------------------------------------- certificates and evidence


def test_commit_certificate_needs_more_than_two_thirds() -> None:
    powers = {k.public_key: 1 for k in KEYS}
    sample_cert(3).verify(CHAIN, powers)
    with pytest.raises(ValidationError, match="2/3"):
        sample_cert(2).verify(CHAIN, powers)
    with pytest.raises(ValidationError, match="2/3"):  # exactly 2/3 of the power is not enough
        sample_cert(2).verify(CHAIN, {KEYS[0].public_key: 1, KEYS[1].public_key: 1, KEYS[2].public_key: 1})
    with pytest.raises(ValidationError, match="not a validator"):
        sample_cert(3).verify(CHAIN, {k.public_key: 1 for k in KEYS[1:]})
    c = sample_cert(3)
    bad = replace(c, signatures=((c.signatures[0][0], b"\x00" * 64), *c.signatures[1:]))
    with pytest.raises(ValidationError, match="bad precommit"):
        bad.verify(CHAIN, powers)
    unsorted = [1, 0, H, [[k, s] for k, s in reversed(c.signatures)]]
    with pytest.raises(DecodeError):
        CommitCertificate.decode(msgpack.packb(unsorted, use_bin_type=True))


def test_evidence_check() -> None:
    a, b = sample_vote(KEYS[1], H), sample_vote(KEYS[1], None)
    DuplicateVoteEvidence.of(a, b).check(CHAIN)
    with pytest.raises(ValidationError):
        DuplicateVoteEvidence.of(a, a).check(CHAIN)
    with pytest.raises(ValidationError):
        DuplicateVoteEvidence.of(a, replace(b, height=4).signed(KEYS[1], CHAIN)).check(CHAIN)
    with pytest.raises(ValidationError):
        DuplicateVoteEvidence.of(a, replace(b, signature=b"\x01" * 64)).check(CHAIN)


def test_block_body_must_match_header() -> None:
    b = sample_block()
    b.check_body()
    with pytest.raises(ValidationError):
        replace(b, updates=b.updates[::-1]).check_body()
    with pytest.raises(ValidationError):
        replace(b, evidence=()).check_body()
    with pytest.raises(ValidationError):
        replace(b, last_commit=None).check_body()
    assert replace(b, last_commit=None, header=replace(b.header, last_commit_hash=empty_commit_hash())).hash() != b.hash()


def test_inline_bundle_must_match_its_announcement() -> None:
    ann = replace(sample_update(), blob_hash=digest(b"abcd")).signed(KEYS[0], CHAIN)
    with pytest.raises(ProtocolError):
        decode_gossip(encode_gossip(UpdateBundle(ann, b"abce")))


# ---------------------------------------------------------------- tensors


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True), max_size=30))
@FAST
def test_tensor_round_trip_is_bit_exact(values: list[float]) -> None:
    arr = np.array(values, dtype=np.float32)
    payload = np.frombuffer(np.random.default_rng(len(values)).bytes(4 * len(values)), dtype=np.float32)
    t = {"a": arr, "nan_payloads": payload.copy(), "scalar": np.float32(-0.0).reshape(()), "empty": np.zeros((0, 3), np.float32)}
    back = decode_tensors(encode_tensors(t))
    assert list(back) == list(t)
    for k in t:
        assert back[k].shape == t[k].shape and back[k].tobytes() == np.asarray(t[k], np.float32).tobytes()
    assert tensors_hash(back) == tensors_hash(t)


@pytest.mark.parametrize(
    "item",
    [
        ["w", "<f8", [2], b"\x00" * 16],  # wrong dtype
        ["w", "<f4", [3], b"\x00" * 8],  # length does not fit the shape
        ["w", "<f4", [1 << 31, 1 << 31], b""],  # absurd shape
        ["w", "<f4", [-1], b""],  # negative dimension
    ],
)
def test_bad_tensors_are_refused(item: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        decode_tensors(msgpack.packb(["flnode/tensors/v1", [item]], use_bin_type=True))


# ---------------------------------------------------------------- genesis


def sample_genesis() -> Genesis:
    return Genesis(CHAIN, "2026-01-01T00:00:00Z", tuple(ValidatorInfo(f"n{i}", k.public_key.hex(), 1) for i, k in
                                                        enumerate(KEYS)), TaskSpec(), "11" * 32, Rules())


def test_genesis_round_trip_and_hash(tmp_path: Path) -> None:
    g = sample_genesis()
    g.save(tmp_path / "g.json")
    assert Genesis.load(tmp_path / "g.json") == g
    assert replace(g, chain_id="x").hash() != g.hash()
    assert replace(g, rules=replace(g.rules, norm_bound=5.0)).hash() != g.hash()
    assert replace(g, task=replace(g.task, seed=1)).hash() != g.hash()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(surprise=1) or d, None),
        (lambda d: d["task"].update(model=3) or d, "string"),
        (lambda d: d["rules"].update(norm_bound="big") or d, "number"),
        (lambda d: d["rules"].update(unknown=1) or d, "unknown"),
        (lambda d: d["validators"][0].update(public_key="zz") or d, "hex"),
        (lambda d: d["validators"][0].update(power=0) or d, "power"),
        (lambda d: d["validators"].append(dict(d["validators"][0])) or d, "twice"),
        (lambda d: d.pop("chain_id") and d, "chain_id"),
        (lambda d: d.update(initial_model_hash="ab") or d, "initial_model_hash"),
        (lambda d: d["rules"].update(aggregator="mean") or d, "aggregator"),
    ],
)
def test_bad_genesis_is_refused(mutate: Callable[[dict[str, Any]], dict[str, Any]], match: str | None) -> None:
    d = json.loads(json.dumps(sample_genesis().to_json_dict()))
    d = mutate(d)
    if match is None:  # unknown top-level fields are ignored only if harmless: they must not change the hash
        try:
            g = Genesis.from_json_dict(d)
        except GenesisError:
            return
        assert g.hash() == sample_genesis().hash()
        return
    with pytest.raises(GenesisError, match=match):
        Genesis.from_json_dict(d)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=10))
@FAST
def test_genesis_parser_raises_only_genesis_errors(value: Any) -> None:
    try:
        Genesis.from_json_dict(value)
    except GenesisError:
        pass
