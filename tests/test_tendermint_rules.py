"""The paper's rules, one step table each: (events fed, expected actions, expected state), named by line.

Buchman, Kwon, Milosevic, "The latest gossip on BFT consensus" (2018), Algorithm 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from flnode.consensus import (
    Broadcast,
    Commit,
    EmitEvidence,
    GetValue,
    Persist,
    ProposalReceived,
    ScheduleTimeout,
    StartHeight,
    Step,
    Tendermint,
    TimeoutConfig,
    TimeoutFired,
    TimeoutKind,
    ValidateValue,
    ValidatorSet,
    ValueReady,
    ValueValidated,
    VoteReceived,
)
from flnode.consensus.machine import FUTURE_BUFFER
from flnode.consensus.sim import fake_sign, make_block
from flnode.protocol.messages import Proposal, Vote, VoteType

KEYS = sorted(hashlib.sha256(b"k%d" % i).digest() for i in range(4))
VALS = ValidatorSet({k: 1 for k in KEYS})
TC = TimeoutConfig(3000, 500, 1000, 500, 1000, 500)
PV, PC = VoteType.PREVOTE, VoteType.PRECOMMIT
A = make_block(1, KEYS[0], 1)
B = make_block(1, KEYS[0], 2)


def machine(me: bytes) -> Tendermint:
    return Tendermint(VALS, me, lambda kind, payload: fake_sign(me, kind, payload), TC)


def vote(k: bytes, t: VoteType, r: int, block_hash: bytes | None, h: int = 1) -> Vote:
    v = Vote(t, h, r, block_hash, k)
    return replace(v, signature=fake_sign(k, Vote.KIND, v.sign_payload()))


def proposal(r: int, block: object, pol: int = -1, h: int = 1) -> Proposal:
    k = VALS.proposer(h, r)
    p = Proposal(h, r, pol, block, k)  # type: ignore[arg-type]
    return replace(p, signature=fake_sign(k, Proposal.KIND, p.sign_payload()))


def not_proposer(r: int, h: int = 1) -> bytes:
    return next(k for k in KEYS if k != VALS.proposer(h, r))


def broadcasts(actions: list[object]) -> list[object]:
    return [a.message for a in actions if isinstance(a, Broadcast)]


def own_votes(actions: list[object], t: VoteType) -> list[bytes | None]:
    return [m.block_hash for m in broadcasts(actions) if isinstance(m, Vote) and m.type == t]


def timeouts(actions: list[object]) -> list[TimeoutKind]:
    return [a.kind for a in actions if isinstance(a, ScheduleTimeout)]


def at_prevote_step(me: bytes, r: int = 0, block: object = A) -> Tendermint:
    """A validator that received the round's proposal, validated it and prevoted for it."""
    m = machine(me)
    m.step(StartHeight(1))
    for rr in range(r):
        m.step(TimeoutFired(TimeoutKind.PRECOMMIT, 1, rr))
    m.step(ProposalReceived(proposal(r, block)))
    m.step(ValueValidated(1, r, block.hash(), True))  # type: ignore[attr-defined]
    return m


def test_proposer_rotation_is_weighted_round_robin() -> None:
    # equal power: every validator proposes once per 4 steps, ties to the smaller address first
    seq = [VALS.proposer(1, r) for r in range(8)]
    assert seq[:4] == KEYS and seq[4:] == KEYS
    weighted = ValidatorSet({KEYS[0]: 3, KEYS[1]: 1})
    picks = [weighted.proposer(h, 0) for h in range(1, 9)]
    assert picks.count(KEYS[0]) == 6 and picks.count(KEYS[1]) == 2


def test_quorums() -> None:
    assert VALS.quorum() == 3
    assert ValidatorSet({KEYS[0]: 1, KEYS[1]: 1, KEYS[2]: 1}).quorum() == 3
    assert ValidatorSet({k: 1 for k in KEYS[:4]} | {b"x" * 32: 3}).quorum() == 5


def test_L11_L18_proposer_asks_for_a_value_others_wait() -> None:
    p = machine(VALS.proposer(1, 0))
    acts = p.step(StartHeight(1))
    assert [a for a in acts if isinstance(a, GetValue)] == [GetValue(1, 0)]
    assert TimeoutKind.PROPOSE in timeouts(acts)
    o = machine(not_proposer(0))
    acts = o.step(StartHeight(1))
    assert not [a for a in acts if isinstance(a, GetValue)]
    assert TimeoutKind.PROPOSE in timeouts(acts)
    assert (o.height, o.round, o.current_step) == (1, 0, Step.PROPOSE)


def test_L19_L22_proposer_persists_then_broadcasts_proposal_and_prevote() -> None:
    me = VALS.proposer(1, 0)
    m = machine(me)
    m.step(StartHeight(1))
    acts = m.step(ValueReady(1, 0, A))
    kinds = [type(a).__name__ for a in acts]
    # Persist comes before each Broadcast of an own signed message
    assert kinds.index("Persist") < kinds.index("Broadcast")
    props = [b for b in broadcasts(acts) if isinstance(b, Proposal)]
    assert len(props) == 1 and props[0].block == A and props[0].pol_round == -1
    assert own_votes(acts, PV) == [A.hash()]
    assert m.current_step == Step.PREVOTE


@pytest.mark.parametrize("valid, expected", [(True, A.hash()), (False, None)])
def test_L22_prevote_follows_validity(valid: bool, expected: bytes | None) -> None:
    m = machine(not_proposer(0))
    m.step(StartHeight(1))
    acts = m.step(ProposalReceived(proposal(0, A)))
    assert [a for a in acts if isinstance(a, ValidateValue)] == [ValidateValue(1, 0, A)]
    assert own_votes(acts, PV) == []  # waits for the application
    acts = m.step(ValueValidated(1, 0, A.hash(), valid))
    assert own_votes(acts, PV) == [expected]
    assert m.current_step == Step.PREVOTE


def test_L22_locked_validator_prevotes_nil_for_another_value() -> None:
    me = next(k for k in KEYS if k not in (VALS.proposer(1, 0), VALS.proposer(1, 1)))
    m = at_prevote_step(me)
    for k in KEYS[:3]:
        m.step(VoteReceived(vote(k, PV, 0, A.hash())))
    assert m.locked_round == 0 and m.locked_value == A
    m.step(TimeoutFired(TimeoutKind.PRECOMMIT, 1, 0))  # L65: round 1
    m.step(ProposalReceived(proposal(1, B)))
    acts = m.step(ValueValidated(1, 1, B.hash(), True))
    assert own_votes(acts, PV) == [None]


@pytest.mark.parametrize(
    "locked_round, pol_round, expected",
    [(-1, 0, "A"), (0, 1, "A"), (1, 0, None)],
    ids=["unlocked accepts", "lock older than POL: unlock", "lock newer than POL: nil"],
)
def test_L28_proof_of_lock(locked_round: int, pol_round: int, expected: str | None) -> None:
    me = not_proposer(2)
    m = machine(me)
    m.step(StartHeight(1))
    m.step(TimeoutFired(TimeoutKind.PRECOMMIT, 1, 0))
    m.step(TimeoutFired(TimeoutKind.PRECOMMIT, 1, 1))
    assert m.round == 2
    if locked_round >= 0:
        m.locked_value, m.locked_round = B, locked_round
    for k in KEYS[:3]:
        m.step(VoteReceived(vote(k, PV, pol_round, A.hash())))
    m.step(ProposalReceived(proposal(2, A, pol=pol_round)))
    acts = m.step(ValueValidated(1, 2, A.hash(), True))
    assert own_votes(acts, PV) == [A.hash() if expected == "A" else None]


def test_L28_without_the_polka_waits_for_the_timeout() -> None:
    m = machine(not_proposer(1))
    m.step(StartHeight(1))
    m.step(TimeoutFired(TimeoutKind.PRECOMMIT, 1, 0))
    m.step(ProposalReceived(proposal(1, A, pol=0)))
    acts = m.step(ValueValidated(1, 1, A.hash(), True))
    assert own_votes(acts, PV) == []
    acts = m.step(TimeoutFired(TimeoutKind.PROPOSE, 1, 1))  # L57
    assert own_votes(acts, PV) == [None]


def test_L34_timeout_prevote_once_on_any_two_thirds() -> None:
    m = at_prevote_step(not_proposer(0))
    m.step(VoteReceived(vote(KEYS[0], PV, 0, None)))
    acts = m.step(VoteReceived(vote(KEYS[1], PV, 0, B.hash())))
    acts += m.step(VoteReceived(vote(KEYS[2], PV, 0, None)))
    acts += m.step(VoteReceived(vote(KEYS[3], PV, 0, None)))
    assert timeouts(acts).count(TimeoutKind.PREVOTE) == 1


def test_L36_polka_locks_and_precommits() -> None:
    me = not_proposer(0)
    m = at_prevote_step(me)
    acts = []
    for k in [k for k in KEYS if k != me][:2]:
        acts += m.step(VoteReceived(vote(k, PV, 0, A.hash())))
    assert own_votes(acts, PC) == [A.hash()]
    assert (m.locked_value, m.locked_round, m.valid_value, m.valid_round) == (A, 0, A, 0)
    assert m.current_step == Step.PRECOMMIT
    persisted = [a for a in acts if isinstance(a, Persist)]
    assert persisted, "the precommit (and the lock) must be persisted before it is sent"


def test_L44_nil_polka_precommits_nil() -> None:
    me = not_proposer(0)
    m = at_prevote_step(me)
    acts = []
    for k in [k for k in KEYS if k != me]:
        acts += m.step(VoteReceived(vote(k, PV, 0, None)))
    assert own_votes(acts, PC) == [None]
    assert m.locked_round == -1


def test_L47_L65_precommit_timeout_then_next_round() -> None:
    me = not_proposer(0)
    m = at_prevote_step(me)
    acts = []
    for k in [k for k in KEYS if k != me]:
        acts += m.step(VoteReceived(vote(k, PC, 0, None)))
    assert TimeoutKind.PRECOMMIT in timeouts(acts)
    acts = m.step(TimeoutFired(TimeoutKind.PRECOMMIT, 1, 0))
    assert m.round == 1 and m.current_step == Step.PROPOSE


def test_L49_decide_with_certificate() -> None:
    me = not_proposer(0)
    m = at_prevote_step(me)
    acts = []
    for k in KEYS[:3]:
        acts += m.step(VoteReceived(vote(k, PC, 0, A.hash())))
    commits = [a for a in acts if isinstance(a, Commit)]
    assert len(commits) == 1
    c = commits[0]
    assert c.block == A and c.certificate.block_hash == A.hash() and len(c.certificate.signatures) >= 3
    for v, sig in c.certificate.signatures:
        assert sig == fake_sign(v, Vote.KIND, vote(v, PC, 0, A.hash()).sign_payload())
    assert m.step(VoteReceived(vote(KEYS[3], PC, 0, A.hash()))) == []  # decided: nothing more at this height


def test_L49_decides_a_proposal_of_an_earlier_round() -> None:
    me = not_proposer(0)
    m = at_prevote_step(me)
    m.step(TimeoutFired(TimeoutKind.PREVOTE, 1, 0))
    m.step(TimeoutFired(TimeoutKind.PRECOMMIT, 1, 0))
    assert m.round == 1
    acts = []
    for k in [k for k in KEYS if k != me][:3]:
        acts += m.step(VoteReceived(vote(k, PC, 0, A.hash())))
    assert [a.block for a in acts if isinstance(a, Commit)] == [A]


def test_L55_f_plus_one_from_a_higher_round_skips_ahead() -> None:
    m = machine(not_proposer(0))
    m.step(StartHeight(1))
    m.step(VoteReceived(vote(KEYS[0], PV, 5, None)))
    assert m.round == 0  # f = 1: one vote is not enough
    m.step(VoteReceived(vote(KEYS[1], PC, 5, None)))
    assert m.round == 5


def test_L57_L61_timeouts() -> None:
    m = machine(not_proposer(0))
    m.step(StartHeight(1))
    acts = m.step(TimeoutFired(TimeoutKind.PROPOSE, 1, 0))
    assert own_votes(acts, PV) == [None] and m.current_step == Step.PREVOTE
    acts = m.step(TimeoutFired(TimeoutKind.PREVOTE, 1, 0))
    assert own_votes(acts, PC) == [None] and m.current_step == Step.PRECOMMIT
    # a propose timeout arriving late (we are past that step) signs nothing new
    late = m.step(TimeoutFired(TimeoutKind.PROPOSE, 1, 0))
    assert own_votes(late, PV) == [] and own_votes(late, PC) == []


def test_stale_timeouts_are_ignored() -> None:
    m = machine(not_proposer(0))
    m.step(StartHeight(1))
    m.step(TimeoutFired(TimeoutKind.PRECOMMIT, 1, 0))
    assert m.round == 1
    assert own_votes(m.step(TimeoutFired(TimeoutKind.PROPOSE, 1, 0)), PV) == []
    assert m.step(TimeoutFired(TimeoutKind.PROPOSE, 9, 1)) == []


def test_timeouts_grow_with_the_round() -> None:
    assert [TC.duration(TimeoutKind.PROPOSE, r) for r in range(3)] == [3000, 3500, 4000]


def test_double_vote_emits_evidence_once() -> None:
    m = machine(not_proposer(0))
    m.step(StartHeight(1))
    a = vote(KEYS[1], PV, 0, A.hash())
    b = vote(KEYS[1], PV, 0, B.hash())
    m.step(VoteReceived(a))
    acts = m.step(VoteReceived(b))
    ev = [x.evidence for x in acts if isinstance(x, EmitEvidence)]
    assert len(ev) == 1 and {ev[0].vote_a, ev[0].vote_b} == {a, b}
    assert not [x for x in m.step(VoteReceived(b)) if isinstance(x, EmitEvidence)]


def test_restart_never_signs_a_different_vote() -> None:
    me = not_proposer(0)
    m = at_prevote_step(me)  # prevoted A in round 0
    records = list(m_records(me, m))
    restored = Tendermint.restore(VALS, me, lambda kind, payload: fake_sign(me, kind, payload), TC, records)
    acts = restored.step(StartHeight(1))
    # the proposal now looks invalid to the restarted node: it must re-send its old prevote, not sign nil
    acts += restored.step(ProposalReceived(proposal(0, A)))
    acts += restored.step(ValueValidated(1, 0, A.hash(), False))
    assert own_votes(acts, PV) == [A.hash()]
    assert restored.round == 0


def m_records(me: bytes, m: Tendermint) -> list[bytes]:
    """Replay the same inputs while capturing Persist records (what the shell stores before sending)."""
    m2 = machine(me)
    out: list[bytes] = []
    for ev in (StartHeight(1), ProposalReceived(proposal(0, A)), ValueValidated(1, 0, A.hash(), True)):
        out += [a.record for a in m2.step(ev) if isinstance(a, Persist)]
    assert out
    return out


def test_torn_last_record_is_ignored_safely() -> None:
    me = not_proposer(0)
    m = machine(me)
    recs: list[bytes] = []
    for ev in (StartHeight(1), ProposalReceived(proposal(0, A)), ValueValidated(1, 0, A.hash(), True)):
        recs += [a.record for a in m.step(ev) if isinstance(a, Persist)]
    for k in KEYS[:3]:
        recs += [a.record for a in m.step(VoteReceived(vote(k, PV, 0, A.hash()))) if isinstance(a, Persist)]
    assert len(recs) >= 2  # prevote, precommit (+ lock)
    torn = recs[:-1] + [recs[-1][: len(recs[-1]) // 2]]
    r = Tendermint.restore(VALS, me, lambda kind, payload: fake_sign(me, kind, payload), TC, torn)
    acts = r.step(StartHeight(1))
    assert r.round == 0
    # the precommit was torn, so it never left: the restored node may precommit, but only for A
    for k in KEYS[:3]:
        acts += r.step(VoteReceived(vote(k, PV, 0, A.hash())))
    acts += r.step(ProposalReceived(proposal(0, A)))
    acts += r.step(ValueValidated(1, 0, A.hash(), True))
    assert set(own_votes(acts, PC)) <= {A.hash()}
    assert set(own_votes(acts, PV)) == {A.hash()}
    # garbage records never crash restore
    Tendermint.restore(VALS, me, None, TC, [b"\xff\x00garbage", b""])


def test_future_height_messages_are_buffered_and_bounded() -> None:
    m = machine(not_proposer(0, h=2))
    m.step(StartHeight(1))
    future = vote(KEYS[0], PV, 0, None, h=2)
    m.step(VoteReceived(future))
    for i in range(FUTURE_BUFFER + 500):
        m.step(VoteReceived(vote(KEYS[1], PV, i % 50, hashlib.sha256(b"%d" % i).digest(), h=2)))
    assert len(m._future) <= FUTURE_BUFFER
    m.step(StartHeight(2))
    assert m.votes[0].power_for(PV, None) >= 1  # replayed at StartHeight
    assert m.step(VoteReceived(vote(KEYS[2], PV, 0, None, h=1))) == []  # stale height ignored
