"""The last-sign guard: the signer refuses any signature that conflicts with one already made, even when the chain
store (and with it the consensus records) was deleted; a crash while the guard file is written is harmless."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import examples
from flnode.consensus import (
    Broadcast,
    Persist,
    ProposalReceived,
    SignRefused,
    StartHeight,
    Tendermint,
    TimeoutConfig,
    TimeoutFired,
    TimeoutKind,
    ValidatorSet,
    ValueReady,
    ValueValidated,
)
from flnode.consensus.sim import fake_sign, make_block
from flnode.node.signer import (
    DoubleSignRefused,
    LastSignGuard,
    SignGuardError,
    guarded,
    sign_position,
)
from flnode.protocol.messages import Proposal, Vote, VoteType
from hypothesis import given, settings
from hypothesis import strategies as st

KEYS = [hashlib.sha256(b"validator-%d" % i).digest() for i in range(4)]
VS = ValidatorSet({k: 1 for k in KEYS})
TC = TimeoutConfig()
ME = next(k for k in KEYS if k not in (VS.proposer(1, 0), VS.proposer(1, 1)))
A, B = make_block(1, VS.proposer(1, 0), 1), make_block(1, VS.proposer(1, 0), 2)
H1, H2 = b"\x01" * 32, b"\x02" * 32


def raw_sign(kind: str, payload: bytes) -> bytes:
    return fake_sign(ME, kind, payload)


def proposal(r: int, block: Any) -> ProposalReceived:
    k = VS.proposer(1, r)
    p = Proposal(1, r, -1, block, k)
    return ProposalReceived(Proposal(1, r, -1, block, k, fake_sign(k, Proposal.KIND, p.sign_payload())))


def own_votes(actions: list[Any]) -> list[tuple[int, int, bytes | None]]:
    return [(a.message.round, int(a.message.type), a.message.block_hash) for a in actions
            if isinstance(a, Broadcast) and isinstance(a.message, Vote) and a.message.validator == ME]


# ---------------------------------------------------------------- the guard's rule, as a table

# (case, last signed (h, r, step, hash) or None, request, allowed)
GUARD_TABLE = [
    ("fresh guard signs anything", None, (1, 0, 2, H1), True),
    ("higher step", (1, 0, 2, H1), (1, 0, 3, H2), True),
    ("higher round, lower step", (1, 0, 3, H1), (1, 1, 1, H2), True),
    ("higher height, round 0", (1, 5, 3, H1), (2, 0, 1, H2), True),
    ("same position, same bytes: a re-sign", (1, 0, 2, H1), (1, 0, 2, H1), True),
    ("same position, other bytes: a double sign", (1, 0, 2, H1), (1, 0, 2, H2), False),
    ("lower step", (1, 0, 3, H1), (1, 0, 2, H1), False),
    ("lower round", (1, 2, 1, H1), (1, 1, 3, H1), False),
    ("lower height", (2, 0, 1, H1), (1, 9, 3, H1), False),
]


@pytest.mark.parametrize("case, last, request_, allowed", GUARD_TABLE, ids=[r[0] for r in GUARD_TABLE])
def test_guard_rule(tmp_path: Path, case: str, last: tuple[int, int, int, bytes] | None,
                    request_: tuple[int, int, int, bytes], allowed: bool) -> None:
    path = tmp_path / "sign_state.json"
    if last is not None:
        LastSignGuard(path).check_and_record(*last)
    guard = LastSignGuard(path)  # a restart: the state comes from the file
    if allowed:
        guard.check_and_record(*request_)
        expected = max(request_[:3], last[:3] if last else (0, 0, 0))
        assert guard.last is not None and guard.last.position() == expected
        assert LastSignGuard(path).last == guard.last  # durable
    else:
        with pytest.raises(DoubleSignRefused):
            guard.check_and_record(*request_)
        assert LastSignGuard(path).last == guard.last  # unchanged
        assert guard.last is not None and guard.last.position() == last[:3]  # type: ignore[index]


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 3), st.integers(1, 3), st.sampled_from([H1, H2])),
                max_size=30))
def test_guard_never_allows_two_hashes_for_one_position(requests: list[tuple[int, int, int, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sign_state.json"
        guard = LastSignGuard(path)
        allowed: dict[tuple[int, int, int], bytes] = {}
        highest = (0, 0, 0)
        for i, (h, r, s, ph) in enumerate(requests):
            if i % 7 == 3:
                guard = LastSignGuard(path)  # restarts in between
            try:
                guard.check_and_record(h, r, s, ph)
            except DoubleSignRefused:
                continue
            assert allowed.setdefault((h, r, s), ph) == ph
            assert (h, r, s) >= highest
            highest = (h, r, s)


# ---------------------------------------------------------------- the file


def test_state_file_format_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "home" / "sign_state.json"
    LastSignGuard(path).check_and_record(3, 1, 2, H1)
    assert json.loads(path.read_text()) == {"height": 3, "round": 1, "step": 2, "payload_hash": H1.hex()}
    assert path.stat().st_mode & 0o777 == 0o600
    assert not path.with_name("sign_state.json.tmp").exists()


def test_crash_mid_write_is_harmless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sign_state.json"
    guard = LastSignGuard(path)
    guard.check_and_record(1, 0, 2, H1)
    # the crash hits between writing the temp file and renaming it: the signature is never returned
    real_replace = os.replace

    def crash(src: Any, dst: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        guarded(raw_sign, guard)(Vote.KIND, Vote(VoteType.PRECOMMIT, 1, 0, None, ME).sign_payload())
    assert guard.last is not None and guard.last.position() == (1, 0, 2)  # memory follows the disk
    monkeypatch.setattr(os, "replace", real_replace)
    tmp = path.with_name("sign_state.json.tmp")
    assert tmp.exists()
    tmp.write_bytes(b'{"height": 1, "rou')  # and the temp file is torn too
    restarted = LastSignGuard(path)
    assert restarted.last == guard.last  # the leftover temp file is ignored
    restarted.check_and_record(1, 0, 3, H2)  # and overwritten by the next write
    assert LastSignGuard(path).last.position() == (1, 0, 3)  # type: ignore[union-attr]


@pytest.mark.parametrize("content", [b"", b"{", b'{"height": 1}', b'{"height": 1, "round": 0, "step": 2, '
                                     b'"payload_hash": "zz"}', b'{"height": -1, "round": 0, "step": 2, '
                                     b'"payload_hash": ""}'])
def test_unreadable_state_file_refuses_to_start(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "sign_state.json"
    path.write_bytes(content)
    with pytest.raises(SignGuardError):
        LastSignGuard(path)


# ---------------------------------------------------------------- the signer wrapper


def test_sign_position_reads_votes_and_proposals() -> None:
    v = Vote(VoteType.PREVOTE, 7, 2, A.hash(), ME)
    assert sign_position(Vote.KIND, v.sign_payload()) == (7, 2, 2)
    assert sign_position(Vote.KIND, Vote(VoteType.PRECOMMIT, 7, 2, None, ME).sign_payload()) == (7, 2, 3)
    assert sign_position(Proposal.KIND, Proposal(7, 3, 1, A, ME).sign_payload()) == (7, 3, 1)
    assert sign_position("update", b"anything") is None


def test_guarded_signer_passes_other_kinds_through(tmp_path: Path) -> None:
    guard = LastSignGuard(tmp_path / "s.json")
    sign = guarded(raw_sign, guard)
    assert sign("update", b"x") == raw_sign("update", b"x")
    assert guard.last is None and not (tmp_path / "s.json").exists()


def test_refusal_is_a_sign_refused() -> None:
    assert issubclass(DoubleSignRefused, SignRefused)


# ---------------------------------------------------------------- with the machine: a wiped store


def run(m: Tendermint, events: list[Any], records: list[bytes], sent: list[Any]) -> list[Any]:
    out: list[Any] = []
    for ev in events:
        acts = m.step(ev)
        records += [a.record for a in acts if isinstance(a, Persist)]
        sent += [a.message for a in acts if isinstance(a, Broadcast)]
        out += acts
    return out


def test_wiped_store_cannot_lead_to_a_double_sign(tmp_path: Path) -> None:
    """The node prevoted A and precommitted nil in round 0, then its chain store is deleted (resync): the
    restarted machine has no records, so it would sign again; the guard refuses every conflicting signature,
    allows the identical one, and the node goes on signing in later rounds."""
    path = tmp_path / "sign_state.json"
    records: list[bytes] = []
    sent: list[Any] = []
    m = Tendermint(VS, ME, guarded(raw_sign, LastSignGuard(path)), TC)
    run(m, [StartHeight(1), proposal(0, A), ValueValidated(1, 0, A.hash(), True), TimeoutFired(TimeoutKind.PREVOTE, 1, 0)],
        records, sent)
    assert own_votes([Broadcast(x) for x in sent]) == [(0, 1, A.hash()), (0, 2, None)]

    records.clear()  # chain.sqlite deleted; the guard file lives next to the key and survives
    w = Tendermint(VS, ME, guarded(raw_sign, LastSignGuard(path)), TC)
    out = run(w, [StartHeight(1), proposal(0, B), ValueValidated(1, 0, B.hash(), True)], records, sent)
    assert own_votes(out) == [] and w.sign_refusals == 1  # prevote B refused: it would conflict
    out = run(w, [TimeoutFired(TimeoutKind.PREVOTE, 1, 0)], records, sent)
    assert own_votes(out) == [(0, 2, None)]  # the same precommit nil again: identical bytes, allowed
    out = run(w, [TimeoutFired(TimeoutKind.PRECOMMIT, 1, 0), TimeoutFired(TimeoutKind.PROPOSE, 1, 1)], records, sent)
    assert [v for v in own_votes(out) if v[0] == 1] == [(1, 1, None)]  # round 1 is new ground

    seen: dict[tuple[int, int, int], set[bytes | None]] = {}
    for msg in sent:
        if isinstance(msg, Vote) and msg.validator == ME:
            seen.setdefault((msg.height, msg.round, int(msg.type)), set()).add(msg.block_hash)
    assert all(len(v) == 1 for v in seen.values()), seen


def test_wiped_store_proposer_cannot_propose_another_block(tmp_path: Path) -> None:
    me = VS.proposer(1, 0)
    path = tmp_path / "sign_state.json"
    sign = guarded(lambda k, p: fake_sign(me, k, p), LastSignGuard(path))
    m = Tendermint(VS, me, sign, TC)
    m.step(StartHeight(1))
    out = m.step(ValueReady(1, 0, A))
    assert [a.message.block_hash for a in out if isinstance(a, Broadcast) and isinstance(a.message, Proposal)] == [A.hash()]

    w = Tendermint(VS, me, guarded(lambda k, p: fake_sign(me, k, p), LastSignGuard(path)), TC)
    w.step(StartHeight(1))
    out = w.step(ValueReady(1, 0, B))
    assert not [a for a in out if isinstance(a, Broadcast)] and w.sign_refusals == 1
