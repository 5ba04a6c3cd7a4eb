"""Each rule of the paper ("The latest gossip on BFT consensus", Algorithm 1) as a step table:
(events so far, input event, expected actions, expected state). Actions are summarised as short tuples:

    ("persist",)                         Persist (must precede the Broadcast of the node's own message)
    ("prevote", r, value) / ("precommit", r, value)   Broadcast of a vote; value "A", "B" or None (nil)
    ("proposal", r, value, pol_round)    Broadcast of a proposal
    ("timeout", kind, r, ms)             ScheduleTimeout
    ("get_value", r) / ("validate", value) / ("commit", value, round) / ("evidence", validator index)

Plus the validator set (CometBFT's proposer sequence, quorums, zero power, per-height changes), timeouts,
lock/unlock cases, evidence, crash-restore without double-signing (a torn last record is dropped, any other
unreadable record refuses the restore) and the bounded future-height buffer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import examples
from flnode.consensus import (
    Broadcast,
    Commit,
    CommitReceived,
    EmitEvidence,
    Event,
    GetValue,
    Persist,
    ProposalReceived,
    RestoreError,
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
from flnode.consensus.machine import FUTURE_BUFFER, MAX_ROUND_AHEAD
from flnode.consensus.sim import fake_sign, fake_verify, make_block
from flnode.node.chain.store import ChainStore
from flnode.protocol.encoding import pack, unpack
from flnode.protocol.messages import Block, CommitCertificate, Proposal, Vote, VoteType
from hypothesis import given, settings
from hypothesis import strategies as st

KEYS = [hashlib.sha256(b"validator-%d" % i).digest() for i in range(4)]
VS = ValidatorSet({k: 1 for k in KEYS})
TC = TimeoutConfig()  # propose 3000+500r, prevote/precommit/rebroadcast 1000+500r
P = [VS.proposer(1, r) for r in range(6)]  # proposers of rounds 0..5 at height 1
ME = next(k for k in KEYS if k not in P[:3])  # a validator that proposes none of rounds 0-2
OTHERS = [k for k in KEYS if k != ME]
A = make_block(1, P[0], 1)
B = make_block(1, P[0], 2)
NAMES = {A.hash(): "A", B.hash(): "B"}
PV, PC = VoteType.PREVOTE, VoteType.PRECOMMIT
PROPOSE, PREVOTE, PRECOMMIT = TimeoutKind.PROPOSE, TimeoutKind.PREVOTE, TimeoutKind.PRECOMMIT
REB = TimeoutKind.REBROADCAST


def sign(key: bytes) -> Any:
    return lambda kind, payload: fake_sign(key, kind, payload)


def vote(t: VoteType, r: int, block: Block | None, who: bytes, h: int = 1) -> VoteReceived:
    v = Vote(t, h, r, None if block is None else block.hash(), who)
    return VoteReceived(Vote(t, h, r, v.block_hash, who, fake_sign(who, Vote.KIND, v.sign_payload())))


def votes(t: VoteType, r: int, block: Block | None, who: Sequence[bytes]) -> list[Event]:
    return [vote(t, r, block, k) for k in who]


def proposal(r: int, block: Block, pol: int = -1, h: int = 1) -> ProposalReceived:
    p = Proposal(h, r, pol, block, VS.proposer(h, r))
    return ProposalReceived(Proposal(h, r, pol, block, p.proposer, fake_sign(p.proposer, Proposal.KIND, p.sign_payload())))


def valid(block: Block, ok: bool = True, r: int = 0) -> ValueValidated:
    return ValueValidated(1, r, block.hash(), ok)


def name(h: bytes | None) -> str | None:
    return None if h is None else NAMES.get(h, h.hex()[:8])


def summary(actions: Sequence[object], me: bytes = ME) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for a in actions:
        if isinstance(a, Persist):
            out.append(("persist",))
        elif isinstance(a, Broadcast):
            m = a.message
            if isinstance(m, Proposal):
                out.append(("proposal", m.round, name(m.block_hash), m.pol_round))
            else:
                tag = "prevote" if m.type == PV else "precommit"
                out.append((tag, m.round, name(m.block_hash)) + (() if m.validator == me else ("relay",)))
        elif isinstance(a, ScheduleTimeout):
            out.append(("timeout", a.kind.value, a.round, a.duration_ms))
        elif isinstance(a, GetValue):
            out.append(("get_value", a.round))
        elif isinstance(a, ValidateValue):
            out.append(("validate", name(a.block.hash())))
        elif isinstance(a, Commit):
            out.append(("commit", name(a.block.hash()), a.certificate.round))
        elif isinstance(a, EmitEvidence):
            out.append(("evidence", KEYS.index(a.evidence.validator)))
    return out


def machine(events: Sequence[Event] = (), me: bytes = ME) -> Tendermint:
    m = Tendermint(VS, me, sign(me), TC)
    m.step(StartHeight(1))
    for ev in events:
        m.step(ev)
    return m


def state(m: Tendermint) -> tuple[int, int, str, str | None, int, str | None, int]:
    return (m.height, m.round, m.current_step.name, name(m.locked_value.hash() if m.locked_value else None),
            m.locked_round, name(m.valid_value.hash() if m.valid_value else None), m.valid_round)


# Recipes for the states the tables start from.
SAW_A = [proposal(0, A), valid(A)]  # round 0: proposal A received and valid -> prevoted A (L22)
LOCKED_A0 = SAW_A + votes(PV, 0, A, OTHERS[:2])  # + polka for A -> locked on A in round 0, precommitted A (L36)
TO_ROUND_1 = [TimeoutFired(PRECOMMIT, 1, 0)]  # L65
LOCKED_A0_R1 = LOCKED_A0 + TO_ROUND_1
LOCKED_A0_R2 = LOCKED_A0_R1 + [TimeoutFired(PROPOSE, 1, 1), TimeoutFired(PREVOTE, 1, 1), TimeoutFired(PRECOMMIT, 1, 1)]
POLKA_B1 = votes(PV, 1, B, OTHERS)  # 3 others prevote B in round 1 (a polka ME did not take part in)


def T(kind: TimeoutKind, r: int) -> tuple[Any, ...]:
    return ("timeout", kind.value, r, TC.duration(kind, r))


# (paper line, events before, input, expected actions, expected state (h, r, step, locked, lr, valid, vr))
TABLE: list[tuple[str, list[Event], Event, list[tuple[Any, ...]], tuple[Any, ...]]] = [
    ("L11 a late timer of a past height does nothing", [], TimeoutFired(PROPOSE, 0, 0), [],
     (1, 0, "PROPOSE", None, -1, None, -1)),
    ("L22 proposal asks the application once", [], proposal(0, A), [("validate", "A")],
     (1, 0, "PROPOSE", None, -1, None, -1)),
    ("L22 duplicate proposal is ignored", [proposal(0, A)], proposal(0, A), [], (1, 0, "PROPOSE", None, -1, None, -1)),
    ("L22 valid, not locked -> prevote v", [proposal(0, A)], valid(A), [("persist",), ("prevote", 0, "A")],
     (1, 0, "PREVOTE", None, -1, None, -1)),
    ("L22 invalid -> prevote nil", [proposal(0, A)], valid(A, False), [("persist",), ("prevote", 0, None)],
     (1, 0, "PREVOTE", None, -1, None, -1)),
    ("L22 valid but unfair (omits updates held in time) -> prevote nil", [proposal(0, A)],
     ValueValidated(1, 0, A.hash(), True, fair=False), [("persist",), ("prevote", 0, None)],
     (1, 0, "PREVOTE", None, -1, None, -1)),
    ("L49 an unfair block with 2f+1 precommits is still decided (fairness is a prevote rule only)",
     [proposal(0, A), ValueValidated(1, 0, A.hash(), True, fair=False)] + votes(PC, 0, A, OTHERS[:2]),
     vote(PC, 0, A, OTHERS[2]), [("commit", "A", 0)], (1, 0, "PREVOTE", None, -1, None, -1)),
    ("L28 an unfair block with a proof of lock gets the prevote",
     TO_ROUND_1 + [ValueValidated(1, 0, A.hash(), True, fair=False)] + votes(PV, 0, A, OTHERS),
     proposal(1, A, pol=0), [("persist",), ("prevote", 1, "A")], (1, 1, "PREVOTE", None, -1, None, -1)),
    ("L22 locked on A, proposal B -> prevote nil", LOCKED_A0_R1 + [valid(B)], proposal(1, B),
     [("persist",), ("prevote", 1, None)], (1, 1, "PREVOTE", "A", 0, "A", 0)),
    ("L22 locked on A, proposal A -> prevote A", LOCKED_A0_R1, proposal(1, A),
     [("persist",), ("prevote", 1, "A")], (1, 1, "PREVOTE", "A", 0, "A", 0)),
    ("L22 a proposal from a non-proposer is ignored", [],
     ProposalReceived(Proposal(1, 0, -1, A, P[1], fake_sign(P[1], Proposal.KIND, Proposal(1, 0, -1, A, P[1]).sign_payload()))),
     [], (1, 0, "PROPOSE", None, -1, None, -1)),
    ("L28 proof of lock seen, not locked -> prevote v", TO_ROUND_1 + [valid(A)] + votes(PV, 0, A, OTHERS),
     proposal(1, A, pol=0), [("persist",), ("prevote", 1, "A")], (1, 1, "PREVOTE", None, -1, None, -1)),
    ("L28 proof of lock not seen yet -> wait", TO_ROUND_1 + [valid(A)], proposal(1, A, pol=0), [],
     (1, 1, "PROPOSE", None, -1, None, -1)),
    ("L28 proof of lock never seen -> the propose timeout prevotes nil (L57)",
     TO_ROUND_1 + [valid(A), proposal(1, A, pol=0)], TimeoutFired(PROPOSE, 1, 1), [("persist",), ("prevote", 1, None)],
     (1, 1, "PREVOTE", None, -1, None, -1)),
    ("L28 the polka arrives later -> prevote v", TO_ROUND_1 + [valid(A), proposal(1, A, pol=0)] + votes(PV, 0, A, OTHERS[:2]),
     vote(PV, 0, A, OTHERS[2]), [("persist",), ("prevote", 1, "A")], (1, 1, "PREVOTE", None, -1, None, -1)),
    ("L28 accept: locked on A in round 0, B has a polka in round 1 (unlock)", LOCKED_A0_R2 + POLKA_B1 + [valid(B)],
     proposal(2, B, pol=1), [("persist",), ("prevote", 2, "B")], (1, 2, "PREVOTE", "A", 0, "A", 0)),
    ("L28 reject: locked on A in round 1, B's polka is older (round 0)",
     TO_ROUND_1 + [proposal(1, A), valid(A)] + votes(PV, 1, A, OTHERS[:2]) + votes(PV, 0, B, OTHERS) + [valid(B),
     TimeoutFired(PRECOMMIT, 1, 1)],
     proposal(2, B, pol=0), [("persist",), ("prevote", 2, None)], (1, 2, "PREVOTE", "A", 1, "A", 1)),
    ("L28 invalid value with a polka -> prevote nil", TO_ROUND_1 + [valid(A, False)] + votes(PV, 0, A, OTHERS),
     proposal(1, A, pol=0), [("persist",), ("prevote", 1, None)], (1, 1, "PREVOTE", None, -1, None, -1)),
    ("L34 2f+1 prevotes of mixed values -> prevote timeout (once)", SAW_A + [vote(PV, 0, None, OTHERS[0])],
     vote(PV, 0, B, OTHERS[1]), [T(PREVOTE, 0)], (1, 0, "PREVOTE", None, -1, None, -1)),
    ("L34 fires only the first time", SAW_A + [vote(PV, 0, None, OTHERS[0]), vote(PV, 0, B, OTHERS[1])],
     vote(PV, 0, None, OTHERS[2]), [], (1, 0, "PREVOTE", None, -1, None, -1)),
    ("L36 polka for the valid proposal in step prevote -> lock, precommit", SAW_A + [vote(PV, 0, A, OTHERS[0])],
     vote(PV, 0, A, OTHERS[1]), [T(PREVOTE, 0), ("persist",), ("precommit", 0, "A")],
     (1, 0, "PRECOMMIT", "A", 0, "A", 0)),
    ("L36 polka in step precommit -> valid value only, no new precommit",
     SAW_A + [vote(PV, 0, None, OTHERS[0]), vote(PV, 0, A, OTHERS[1]), TimeoutFired(PREVOTE, 1, 0)],
     vote(PV, 0, A, OTHERS[2]), [], (1, 0, "PRECOMMIT", None, -1, "A", 0)),
    ("L36 polka for an invalid value -> nothing", [proposal(0, A), valid(A, False)] + votes(PV, 0, A, OTHERS[:2]),
     vote(PV, 0, A, OTHERS[2]), [], (1, 0, "PREVOTE", None, -1, None, -1)),
    ("L44 2f+1 prevotes nil -> precommit nil", SAW_A + votes(PV, 0, None, OTHERS[:2]), vote(PV, 0, None, OTHERS[2]),
     [("persist",), ("precommit", 0, None)], (1, 0, "PRECOMMIT", None, -1, None, -1)),
    ("L47 2f+1 precommits of any kind -> precommit timeout (once)", LOCKED_A0 + [vote(PC, 0, None, OTHERS[0])],
     vote(PC, 0, B, OTHERS[1]), [T(PRECOMMIT, 0)], (1, 0, "PRECOMMIT", "A", 0, "A", 0)),
    ("L49 proposal + 2f+1 precommits for it -> decide with a certificate",
     SAW_A + votes(PC, 0, A, OTHERS[:2]), vote(PC, 0, A, OTHERS[2]), [("commit", "A", 0)],
     (1, 0, "PREVOTE", None, -1, None, -1)),
    ("L49 precommits without the proposal -> no decision", votes(PC, 0, A, OTHERS[:2]), vote(PC, 0, A, OTHERS[2]),
     [T(PRECOMMIT, 0)], (1, 0, "PROPOSE", None, -1, None, -1)),
    ("L49 the proposal arrives last -> validate, then decide", votes(PC, 0, A, OTHERS) + [proposal(0, A)], valid(A),
     [("commit", "A", 0)], (1, 0, "PROPOSE", None, -1, None, -1)),
    ("L49 decides a value of an earlier round", LOCKED_A0_R1 + votes(PC, 0, A, OTHERS[:1]), vote(PC, 0, A, OTHERS[1]),
     [("commit", "A", 0)], (1, 1, "PROPOSE", "A", 0, "A", 0)),
    ("L55 f+1 messages of a higher round -> start that round", [vote(PV, 3, None, OTHERS[0])],
     vote(PC, 3, None, OTHERS[1]), [T(REB, 3), ("get_value", 3), T(PROPOSE, 3)], (1, 3, "PROPOSE", None, -1, None, -1)),
    ("L55 f messages of a higher round are not enough", [], vote(PV, 3, None, OTHERS[0]), [],
     (1, 0, "PROPOSE", None, -1, None, -1)),
    ("L57 propose timeout in step propose -> prevote nil", [], TimeoutFired(PROPOSE, 1, 0),
     [("persist",), ("prevote", 0, None)], (1, 0, "PREVOTE", None, -1, None, -1)),
    ("L57 propose timeout after prevoting -> nothing", SAW_A, TimeoutFired(PROPOSE, 1, 0), [],
     (1, 0, "PREVOTE", None, -1, None, -1)),
    ("L57 a stale propose timeout (older round) -> nothing", TO_ROUND_1, TimeoutFired(PROPOSE, 1, 0), [],
     (1, 1, "PROPOSE", None, -1, None, -1)),
    ("L61 prevote timeout in step prevote -> precommit nil", SAW_A, TimeoutFired(PREVOTE, 1, 0),
     [("persist",), ("precommit", 0, None)], (1, 0, "PRECOMMIT", None, -1, None, -1)),
    ("L61 prevote timeout in step propose -> nothing", [], TimeoutFired(PREVOTE, 1, 0), [],
     (1, 0, "PROPOSE", None, -1, None, -1)),
    ("L65 precommit timeout -> re-send own votes, next round", LOCKED_A0, TimeoutFired(PRECOMMIT, 1, 0),
     [("prevote", 0, "A"), ("precommit", 0, "A"), ("prevote", 0, "A", "relay"), ("prevote", 0, "A", "relay"),
      T(REB, 1), T(PROPOSE, 1)],
     (1, 1, "PROPOSE", "A", 0, "A", 0)),
    ("rebroadcast timer re-sends own votes of the round and backs off", SAW_A, TimeoutFired(REB, 1, 0),
     [("timeout", "rebroadcast", 0, 2000), ("prevote", 0, "A")], (1, 0, "PREVOTE", None, -1, None, -1)),
    ("a decided machine ignores further input", SAW_A + votes(PC, 0, A, OTHERS), TimeoutFired(PRECOMMIT, 1, 0), [],
     (1, 0, "PREVOTE", None, -1, None, -1)),
    # Validation is asked for only when a rule can use the answer: a flood of proposals for rounds ahead costs no
    # block fetch or execution.
    ("a proposal for a later round is not validated on arrival", [], proposal(2, A), [],
     (1, 0, "PROPOSE", None, -1, None, -1)),
    ("a proposal for a later round is validated when the node reaches that round (L65 -> L11)", [proposal(1, A)],
     TimeoutFired(PRECOMMIT, 1, 0), [T(REB, 1), ("validate", "A"), T(PROPOSE, 1)], (1, 1, "PROPOSE", None, -1, None, -1)),
    ("a proposal for a later round is validated when L55 skips to that round",
     [proposal(2, A), vote(PV, 2, None, OTHERS[0])], vote(PC, 2, None, OTHERS[1]),
     [T(REB, 2), ("validate", "A"), T(PROPOSE, 2)], (1, 2, "PROPOSE", None, -1, None, -1)),
    ("both proposals of an equivocating proposer are validated on reaching their round",
     [proposal(1, A), proposal(1, B)], TimeoutFired(PRECOMMIT, 1, 0),
     [T(REB, 1), ("validate", "A"), ("validate", "B"), T(PROPOSE, 1)], (1, 1, "PROPOSE", None, -1, None, -1)),
    ("the validated later-round proposal is prevoted on arrival in its round (L22)", [proposal(1, A), valid(A)],
     TimeoutFired(PRECOMMIT, 1, 0), [T(REB, 1), T(PROPOSE, 1), ("persist",), ("prevote", 1, "A")],
     (1, 1, "PREVOTE", None, -1, None, -1)),
    ("a proposal of an earlier round is not validated without 2f+1 precommits for it", TO_ROUND_1, proposal(0, A), [],
     (1, 1, "PROPOSE", None, -1, None, -1)),
    ("L49 asks to validate an earlier round's proposal once 2f+1 precommit it",
     TO_ROUND_1 + [proposal(0, A)] + votes(PC, 0, A, OTHERS[:2]), vote(PC, 0, A, OTHERS[2]), [("validate", "A")],
     (1, 1, "PROPOSE", None, -1, None, -1)),
    ("L49 ... and decides it when the answer comes", TO_ROUND_1 + [proposal(0, A)] + votes(PC, 0, A, OTHERS),
     valid(A), [("commit", "A", 0)], (1, 1, "PROPOSE", None, -1, None, -1)),
    ("L49 the precommits came first, the earlier round's proposal last -> validate it", TO_ROUND_1 + votes(PC, 0, A, OTHERS),
     proposal(0, A), [("validate", "A")], (1, 1, "PROPOSE", None, -1, None, -1)),
    # L55 is tracked as votes arrive: the highest round with f+1 power, never a scan of the rounds ahead.
    ("L55 f votes in each of 64 rounds ahead move nothing", [vote(PV, r, None, OTHERS[0]) for r in range(1, 64)],
     vote(PC, 64, None, OTHERS[0]), [], (1, 0, "PROPOSE", None, -1, None, -1)),
    ("L55 junk of one validator in every round ahead, a second validator in round 9 -> round 9",
     [vote(PV, r, None, OTHERS[0]) for r in range(1, 65)], vote(PV, 9, None, OTHERS[1]),
     [T(REB, 9), T(PROPOSE, 9)], (1, 9, "PROPOSE", None, -1, None, -1)),
    ("L55 a round below the current one never pulls back", [vote(PV, 9, None, OTHERS[0]), vote(PV, 9, None, OTHERS[1]),
     vote(PV, 5, None, OTHERS[0])], vote(PV, 5, None, OTHERS[1]), [], (1, 9, "PROPOSE", None, -1, None, -1)),
]


@pytest.mark.parametrize("line, before, event, expected, expected_state", TABLE, ids=[t[0] for t in TABLE])
def test_rule(line: str, before: list[Event], event: Event, expected: list[tuple[Any, ...]],
              expected_state: tuple[Any, ...]) -> None:
    m = machine(before)
    assert summary(m.step(event)) == expected
    assert state(m) == expected_state


def test_l11_start_height_not_proposer() -> None:
    m = Tendermint(VS, ME, sign(ME), TC)
    assert summary(m.step(StartHeight(1))) == [T(REB, 0), T(PROPOSE, 0)]
    assert (m.height, m.round, m.current_step) == (1, 0, Step.PROPOSE)
    assert m.step(StartHeight(1)) == []  # idempotent


def test_l11_l18_proposer_gets_a_value_and_proposes_it() -> None:
    m = Tendermint(VS, P[0], sign(P[0]), TC)
    assert summary(m.step(StartHeight(1)), P[0]) == [T(REB, 0), ("get_value", 0), T(PROPOSE, 0)]
    out = m.step(ValueReady(1, 0, A))
    # the proposal and the prevote each are persisted before they are broadcast; the proposer prevotes its own block
    assert summary(out, P[0]) == [("persist",), ("proposal", 0, "A", -1), ("persist",), ("prevote", 0, "A")]
    assert m.step(ValueReady(1, 0, B)) == []  # one value per round


def test_l15_proposer_re_proposes_its_valid_value_with_its_round() -> None:
    assert P[3] == ME  # (the L55 row above relies on it too)
    m = machine(SAW_A + votes(PV, 0, A, [k for k in KEYS if k != P[1]][:2]), me=P[1])
    assert m.valid_value == A
    out = m.step(TimeoutFired(PRECOMMIT, 1, 0))
    s = summary(out, P[1])
    assert ("proposal", 1, "A", 0) in s and ("get_value", 1) not in s
    assert s.index(("persist",)) < s.index(("proposal", 1, "A", 0))
    assert ("prevote", 1, "A") in s  # it accepts its own proof-of-lock proposal (L28)


def test_l49_certificate_verifies_by_power() -> None:
    m = machine(SAW_A + votes(PC, 0, A, OTHERS))
    assert m.decided == A
    m2 = machine(SAW_A + votes(PC, 0, A, OTHERS[:2]))
    (commit,) = [a for a in m2.step(vote(PC, 0, A, OTHERS[2])) if isinstance(a, Commit)]
    cert = commit.certificate
    assert (cert.height, cert.round, cert.block_hash) == (1, 0, A.hash())
    signers = [v for v, _ in cert.signatures]
    assert len(signers) == len(set(signers)) and sum(VS.power(v) for v in signers) >= VS.quorum()
    for v, sig in cert.signatures:
        assert fake_verify(v, Vote.KIND, Vote(PC, 1, 0, A.hash(), v).sign_payload(), sig)


def test_commit_received_decides_and_old_heights_are_ignored() -> None:
    src = machine(SAW_A + votes(PC, 0, A, OTHERS[:2]))
    (commit,) = [a for a in src.step(vote(PC, 0, A, OTHERS[2])) if isinstance(a, Commit)]
    m = machine()
    assert summary(m.step(CommitReceived(A, commit.certificate))) == [("commit", "A", 0)]
    assert m.step(CommitReceived(A, commit.certificate)) == []
    m.step(StartHeight(2))
    assert m.step(CommitReceived(A, commit.certificate)) == [] and m.height == 2


def test_equivocating_proposer_second_block_can_still_be_decided() -> None:
    """L49 accepts any proposal of the round's proposer: a node that saw block B first decides A on its quorum."""
    m = machine([proposal(0, B), valid(B), proposal(0, A), valid(A)] + votes(PC, 0, A, OTHERS[:2]))
    assert summary(m.step(vote(PC, 0, A, OTHERS[2]))) == [("commit", "A", 0)]


def test_lock_then_unlock_then_relock() -> None:
    """Locked on A in round 0; a polka for B in round 1 (ME missed round 1) unlocks it in round 2 (L28 with
    vr >= lockedRound), and with a polka for B in round 2 it locks on B."""
    m = machine(LOCKED_A0_R2 + POLKA_B1 + [valid(B), proposal(2, B, pol=1)])
    assert (m.locked_round, m.current_step) == (0, Step.PREVOTE)
    out = m.step(vote(PV, 2, B, OTHERS[0]))
    out += m.step(vote(PV, 2, B, OTHERS[1]))
    assert ("precommit", 2, "B") in summary(out)
    assert state(m) == (1, 2, "PRECOMMIT", "B", 2, "B", 2)


def test_locked_node_never_precommits_another_value_without_a_newer_polka() -> None:
    m = machine(LOCKED_A0_R1 + [valid(B), proposal(1, B)])
    out = m.step(vote(PV, 1, B, OTHERS[0]))
    assert ("precommit", 1, "B") not in summary(out)
    assert m.locked_value == A


# ---------------------------------------------------------------- validator set and timeouts


def test_proposer_sequence_matches_cometbft() -> None:
    """CometBFT's proposer-selection spec, basic example: p1 with power 1, p2 with power 3; run 1 elects p2, run 2
    (a tie at 2, the smaller address wins) p1, then p2 twice, and the pattern repeats."""
    p1, p2 = sorted(KEYS[:2])
    vs = ValidatorSet({p1: 1, p2: 3})
    assert [vs.proposer(h, 0) for h in range(1, 9)] == [p2, p1, p2, p2] * 2
    # a round advances the same sequence: (h, r) is step (h - 1) + r
    assert [vs.proposer(1, r) for r in range(4)] == [vs.proposer(h, 0) for h in range(1, 5)]
    # equal power: plain round robin in address order
    assert [VS.proposer(1, r) for r in range(8)] == sorted(KEYS) * 2


def test_quorums() -> None:
    assert VS.quorum() == 3
    assert ValidatorSet({k: 1 for k in KEYS[:3]}).quorum() == 3
    assert ValidatorSet({k: 1 for k in KEYS} | {b"x" * 32: 3}).quorum() == 5


def test_zero_power_validator_is_no_validator() -> None:
    slashed = ValidatorSet({k: (0 if k == KEYS[3] else 1) for k in KEYS})
    same = ValidatorSet({k: 1 for k in KEYS[:3]})
    assert KEYS[3] not in slashed.powers and slashed.power(KEYS[3]) == 0
    assert (slashed.total_power, slashed.quorum()) == (3, 3)
    # proposer selection is as if the validator were not listed, so every node derives the same sequence
    assert [slashed.proposer(h, r) for h in range(1, 6) for r in range(4)] == [
        same.proposer(h, r) for h in range(1, 6) for r in range(4)]
    assert KEYS[3] not in {slashed.proposer(h, 0) for h in range(1, 20)}
    with pytest.raises(ValueError):
        ValidatorSet({KEYS[0]: 0})
    with pytest.raises(ValueError):
        ValidatorSet({KEYS[0]: 1, KEYS[1]: -1})


def test_timeouts_grow_with_the_round() -> None:
    assert [TC.duration(PROPOSE, r) for r in range(3)] == [3000, 3500, 4000]
    assert [TC.duration(PREVOTE, r) for r in range(3)] == [1000, 1500, 2000]
    assert [TC.duration(PRECOMMIT, r) for r in range(3)] == [1000, 1500, 2000]


def decided_at_height_1(me: bytes) -> Tendermint:
    m = machine(SAW_A + votes(PC, 0, A, OTHERS), me=me)
    assert m.decided == A
    return m


# Validator set changes between heights: (case, this node, powers from height 2 (0 = slashed), height-2 events
# before, input, expected actions, expected (height, round, step)). Each row would go differently under the old set.
W = {k: 1 for k in KEYS}
SLASH_ONE = W | {OTHERS[0]: 0}
SLASH_TWO = W | {OTHERS[1]: 0, OTHERS[2]: 0}
PREVOTED_NIL_2 = [TimeoutFired(PROPOSE, 2, 0)]
VSETS: list[tuple[str, bytes, dict[bytes, int], list[Event], Event, list[tuple[Any, ...]], tuple[int, int, str]]] = [
    ("a slashed validator's vote counts for nothing", ME, SLASH_ONE, PREVOTED_NIL_2 + [vote(PV, 0, None, OTHERS[1], h=2)],
     vote(PV, 0, None, OTHERS[0], h=2), [], (2, 0, "PREVOTE")),
    ("the quorum is recomputed: 2 of 2 after two slashes", ME, SLASH_TWO, PREVOTED_NIL_2,
     vote(PV, 0, None, OTHERS[0], h=2), [T(PREVOTE, 0), ("persist",), ("precommit", 0, None)], (2, 0, "PRECOMMIT")),
    ("a slashed node signs nothing", OTHERS[0], SLASH_ONE, [], TimeoutFired(PROPOSE, 2, 0), [], (2, 0, "PREVOTE")),
    ("f+1 is recomputed: a validator of power 3 out of 6 alone pulls the node to its round", ME,
     W | {OTHERS[1]: 3}, [], vote(PC, 2, None, OTHERS[1], h=2), [T(REB, 2), T(PROPOSE, 2)], (2, 2, "PROPOSE")),
]


@pytest.mark.parametrize("case, me, powers, before, event, expected, expected_state", VSETS, ids=[r[0] for r in VSETS])
def test_set_validators_between_heights(case: str, me: bytes, powers: dict[bytes, int], before: list[Event],
                                        event: Event, expected: list[tuple[Any, ...]],
                                        expected_state: tuple[int, int, str]) -> None:
    m = decided_at_height_1(me)
    m.set_validators(ValidatorSet(powers))
    m.step(StartHeight(2))
    for ev in before:
        m.step(ev)
    assert summary(m.step(event), me) == expected
    assert (m.height, m.round, m.current_step.name) == expected_state


def test_set_validators_only_between_heights() -> None:
    m = machine()
    with pytest.raises(ValueError):
        m.set_validators(VS)  # height 1 is running
    fresh = Tendermint(VS, ME, sign(ME), TC)
    fresh.set_validators(ValidatorSet({k: 2 for k in KEYS}))  # before the first StartHeight
    fresh.step(StartHeight(1))
    assert fresh.validators.quorum() == 6 and fresh.me == ME
    # power back after a slash: the node signs again
    m = decided_at_height_1(ME)
    m.set_validators(ValidatorSet(W | {ME: 0}))
    assert m.me is None
    m.set_validators(ValidatorSet(W))
    assert m.me == ME


def test_set_validators_recounts_a_restored_height() -> None:
    """A restored machine holds its own votes and the polka behind its lock; under the new set they are recounted
    (a slashed voter's prevote no longer counts)."""
    records: list[bytes] = []
    m = Tendermint(VS, ME, sign(ME), TC)
    for ev in [StartHeight(1), *LOCKED_A0]:
        perform(m.step(ev), records, [])
    r = Tendermint.restore(VS, ME, sign(ME), TC, records)
    assert r.votes[0].power_for(PV, A.hash()) == 3
    r.set_validators(ValidatorSet(W | {OTHERS[0]: 0}))
    assert r.votes[0].power_for(PV, A.hash()) == 2 and r.polka is None
    assert r.step(StartHeight(1)) and r.locked_value == A


# ---------------------------------------------------------------- evidence


def test_double_vote_is_evidence_once_and_both_values_count() -> None:
    m = machine()
    bad = OTHERS[0]
    assert m.step(vote(PV, 0, A, bad)) == []
    out = m.step(vote(PV, 0, B, bad))
    assert summary(out) == [("evidence", KEYS.index(bad))]
    ev = out[0].evidence  # type: ignore[union-attr]
    assert {ev.vote_a.block_hash, ev.vote_b.block_hash} == {A.hash(), B.hash()}
    assert m.votes[0].power_for(PV, A.hash()) == 1 and m.votes[0].power_for(PV, B.hash()) == 1
    # a flood of further values from the same validator: no more evidence, nothing counted or stored
    for salt in range(50):
        assert m.step(vote(PV, 0, make_block(1, bad, 100 + salt), bad)) == []
    assert len(m.votes[0].by_value) == 2
    assert m.step(vote(PV, 0, A, bad)) == []  # a duplicate is nothing


def test_votes_from_unknown_validators_and_far_rounds_are_ignored() -> None:
    m = machine()
    stranger = hashlib.sha256(b"stranger").digest()
    assert m.step(vote(PV, 0, A, stranger)) == []
    assert 0 not in m.votes or m.votes[0].power_any(PV) == 0
    assert m.step(vote(PV, 10_000, A, OTHERS[0])) == [] and 10_000 not in m.votes


# ---------------------------------------------------------------- crash safety


def perform(actions: Sequence[object], records: list[bytes], sent: list[Any], tear_at: int | None = None) -> bool:
    """Play the shell: Persist is durable before anything after it. tear_at: crash while writing the Persist with
    that index in this list (its record is torn; nothing after it happens). Returns whether it crashed."""
    persists = 0
    for a in actions:
        if isinstance(a, Persist):
            if tear_at is not None and persists == tear_at:
                records.append(a.record[: len(a.record) // 2])
                return True
            persists += 1
            records.append(a.record)
        elif isinstance(a, Broadcast):
            sent.append(a.message)
    return False


def own_signatures(sent: Sequence[Any], me: bytes) -> dict[tuple[int, int, int], set[bytes | None]]:
    seen: dict[tuple[int, int, int], set[bytes | None]] = {}
    for m in sent:
        if isinstance(m, Vote) and m.validator == me:
            seen.setdefault((m.height, m.round, int(m.type)), set()).add(m.block_hash)
        elif isinstance(m, Proposal) and m.proposer == me:
            seen.setdefault((m.height, m.round, 0), set()).add(m.block_hash)
    return seen


def test_restore_resends_the_signed_vote_instead_of_signing_another() -> None:
    records: list[bytes] = []
    sent: list[Any] = []
    m = Tendermint(VS, ME, sign(ME), TC)
    for ev in [StartHeight(1), *SAW_A]:
        perform(m.step(ev), records, sent)
    r = Tendermint.restore(VS, ME, sign(ME), TC, records)
    out = r.step(StartHeight(1))
    out += r.step(TimeoutFired(PROPOSE, 1, 0))  # would prevote nil in a fresh machine
    out += r.step(proposal(0, B))
    out += r.step(valid(B))
    assert [s for s in summary(out) if s[0] == "prevote"] == [("prevote", 0, "A")] * len(
        [s for s in summary(out) if s[0] == "prevote"])
    assert not [a for a in out if isinstance(a, Persist)]  # nothing new was signed


def test_restore_keeps_the_lock() -> None:
    records: list[bytes] = []
    m = Tendermint(VS, ME, sign(ME), TC)
    for ev in [StartHeight(1), *LOCKED_A0]:
        perform(m.step(ev), records, [])
    r = Tendermint.restore(VS, ME, sign(ME), TC, records)
    r.step(StartHeight(1))
    assert (r.locked_value, r.locked_round) == (A, 0)
    # the polka behind the lock survives the restart, so the node can still prove it (and relay it) to others
    assert r.votes[0].power_for(PV, A.hash()) >= VS.quorum()
    assert ("prevote", 0, "A", "relay") in summary(r.step(TimeoutFired(REB, 1, 0)))
    r.step(TimeoutFired(PRECOMMIT, 1, 0))
    r.step(valid(B))
    assert summary(r.step(proposal(1, B))) == [("persist",), ("prevote", 1, None)]  # still locked on A


@pytest.mark.parametrize("cut", [0, 1, 7, 30, -1])
def test_torn_last_record_is_ignored(cut: int) -> None:
    records: list[bytes] = []
    sent: list[Any] = []
    m = Tendermint(VS, ME, sign(ME), TC)
    perform(m.step(StartHeight(1)), records, sent)
    perform(m.step(SAW_A[0]), records, sent)
    perform(m.step(SAW_A[1]), records, sent)  # prevote A: durable and sent
    out = m.step(TimeoutFired(PREVOTE, 1, 0))  # precommit nil: the crash tears its record
    (rec,) = [a.record for a in out if isinstance(a, Persist)]
    torn = records + [rec[:cut]]
    r = Tendermint.restore(VS, ME, sign(ME), TC, torn)
    assert r.signed.get((0, int(PC))) is None and r.signed[(0, int(PV))].block_hash == A.hash()
    out = r.step(StartHeight(1)) + r.step(TimeoutFired(PROPOSE, 1, 0)) + r.step(TimeoutFired(PREVOTE, 1, 0))
    perform(out, records, sent)
    seen = own_signatures(sent, ME)
    assert all(len(v) == 1 for v in seen.values()), seen


def locked_records() -> list[bytes]:
    """prevote A, precommit A (with the lock and its polka): what a node locked in round 0 has persisted."""
    records: list[bytes] = []
    m = Tendermint(VS, ME, sign(ME), TC)
    for ev in [StartHeight(1), *LOCKED_A0]:
        perform(m.step(ev), records, [])
    assert len(records) == 2
    return records


def five_fields(record: bytes) -> bytes:
    """The record as written before the polka was kept."""
    return pack(unpack(record)[:5])


PV_REC, PC_REC = locked_records()
OTHER_HEIGHT = pack(["vote", 2, 0, Vote(PV, 2, 0, None, ME, b"s" * 64).encode(), None, None])
UNKNOWN_KIND = pack(["ballot", 1, 0, b"", None, None])
ROUND_MISMATCH = pack(["vote", 1, 5] + unpack(PV_REC)[3:])
# (case, records, how many restore replays, or RestoreError: refuse to start)
RESTORE_TABLE: list[tuple[str, list[bytes], int | type[Exception]]] = [
    ("no records", [], 0),
    ("all complete", [PV_REC, PC_REC], 2),
    ("old 5-field records", [five_fields(PV_REC), five_fields(PC_REC)], 2),
    ("torn last record (half)", [PV_REC, PC_REC[: len(PC_REC) // 2]], 1),
    ("torn last record (one byte short)", [PV_REC, PC_REC[:-1]], 1),
    ("torn last record (empty)", [PV_REC, b""], 1),
    ("the only record torn", [PV_REC[:7]], 0),
    ("torn record in the middle: a later signed vote would be forgotten", [PV_REC[:10], PC_REC], RestoreError),
    ("empty record in the middle", [PV_REC, b"", PC_REC], RestoreError),
    ("garbage first", [b"\xff\x00garbage", b""], RestoreError),
    ("complete but undecodable last record (not a tear: it may hold a signature)", [PV_REC, UNKNOWN_KIND],
     RestoreError),
    ("record of another height", [PV_REC, OTHER_HEIGHT], RestoreError),
    ("vote not of its record's round", [ROUND_MISMATCH], RestoreError),
]


@pytest.mark.parametrize("case, records, expected", RESTORE_TABLE, ids=[r[0] for r in RESTORE_TABLE])
def test_restore_records(case: str, records: list[bytes], expected: int | type[Exception]) -> None:
    if isinstance(expected, int):
        assert Tendermint.check_records(records) == expected
        r = Tendermint.restore(VS, ME, sign(ME), TC, records)
        assert len(r.signed) == expected
        if expected == 2:
            assert (r.locked_value, r.locked_round) == (A, 0)
    else:
        with pytest.raises(expected):
            Tendermint.check_records(records)
        with pytest.raises(expected):
            Tendermint.restore(VS, ME, sign(ME), TC, records)


def test_store_deletes_a_torn_last_record_at_startup(tmp_path: Path) -> None:
    store = ChainStore.open(tmp_path / "chain.sqlite")
    for rec in (PV_REC, PC_REC[:9]):
        store.log.append(1, rec)
    assert store.restorable_records(1, Tendermint.check_records) == [PV_REC]
    assert store.log.records(1) == [PV_REC]  # gone, so the next record does not land behind it
    store.log.append(1, PC_REC)
    assert store.restorable_records(1, Tendermint.check_records) == [PV_REC, PC_REC]
    store.log.append(1, b"")
    store.log.append(1, PC_REC)
    with pytest.raises(RestoreError):
        store.restorable_records(1, Tendermint.check_records)
    assert len(store.log.records(1)) == 4  # nothing deleted when the node refuses to start
    store.close()


def relays(actions: Sequence[object]) -> set[tuple[Any, ...]]:
    return {s for s in summary(actions) if s[-1] == "relay"}


def six_fields(record: bytes) -> bytes:
    """The record as written before it kept the votes that moved the node into its round."""
    return pack(unpack(record)[:6])


# (case, what ME saw and did before the crash, the round it resumes, the others' votes it must relay after restart)
ENTRY_TABLE: list[tuple[str, list[Event], int, set[tuple[Any, ...]]]] = [
    # The fuzz find (seed 8095365494332110361663249527507540696, n=4, "split"): ME prevoted nil in round 0, counted
    # 2f+1 precommits (two honest ones for A, the Byzantine one for B), left round 0 by L65, signed in round 1 and
    # restarted. The two honest peers, restarted too, were still in round 0 with only their own precommits for A;
    # the Byzantine validator had decided A (it had all three) and moved to the next height. ME's relay of the
    # round-0 precommits (L47 for the peers) was the only way out, and it had forgotten the Byzantine one.
    ("L65: the 2f+1 precommits of round 0",
     [TimeoutFired(PROPOSE, 1, 0), vote(PC, 0, A, OTHERS[0]), vote(PC, 0, A, OTHERS[1]), vote(PC, 0, B, OTHERS[2]),
      TimeoutFired(PRECOMMIT, 1, 0), TimeoutFired(PROPOSE, 1, 1)],
     1, {("precommit", 0, "A", "relay"), ("precommit", 0, "B", "relay")}),
    # L55: f+1 votes of round 2 pulled ME there; after a restart it relays them, so peers behind skip too (L55)
    ("L55: the f+1 votes of round 2",
     [vote(PV, 0, None, OTHERS[0]), vote(PV, 2, None, OTHERS[0]), vote(PC, 2, B, OTHERS[1]),
      TimeoutFired(PROPOSE, 1, 2)],
     2, {("prevote", 2, None, "relay"), ("precommit", 2, "B", "relay")}),
]


@pytest.mark.parametrize("case, before, resumed, relayed", ENTRY_TABLE, ids=[e[0] for e in ENTRY_TABLE])
def test_restore_relays_the_votes_that_moved_the_node_into_its_round(
        case: str, before: list[Event], resumed: int, relayed: set[tuple[Any, ...]]) -> None:
    records: list[bytes] = []
    m = Tendermint(VS, ME, sign(ME), TC)
    for ev in [StartHeight(1), *before]:
        perform(m.step(ev), records, [])
    assert m.round == resumed and relays(m.step(TimeoutFired(REB, 1, resumed))) >= relayed
    r = Tendermint.restore(VS, ME, sign(ME), TC, records)
    r.step(StartHeight(1))
    assert r.round == resumed
    assert relays(r.step(TimeoutFired(REB, 1, resumed))) >= relayed  # before the fix: only the honest A ones / none
    # the entry is written once, in the first record of the round, and records without it restore as before
    assert sum(len(unpack(rec)) == 7 for rec in records) == 1
    old = Tendermint.restore(VS, ME, sign(ME), TC, [six_fields(rec) for rec in records])
    old.step(StartHeight(1))
    assert old.round == resumed and old.signed == r.signed


def test_peers_left_behind_in_round_0_follow_the_restarted_node() -> None:
    """The other half of the fuzz find: a peer locked on A in round 0 with only the two honest precommits leaves
    round 0 once the restarted node relays the third (Byzantine) precommit."""
    records: list[bytes] = []
    m = Tendermint(VS, ME, sign(ME), TC)
    for ev in [StartHeight(1), *ENTRY_TABLE[0][1]]:
        perform(m.step(ev), records, [])
    r = Tendermint.restore(VS, ME, sign(ME), TC, records)
    r.step(StartHeight(1))
    relayed = [a.message for a in r.step(TimeoutFired(REB, 1, 1)) if isinstance(a, Broadcast)]
    peer_key = OTHERS[0]
    peer = machine([proposal(0, A), valid(A), *votes(PV, 0, A, OTHERS[1:]), vote(PC, 0, A, OTHERS[1])], me=peer_key)
    assert state(peer)[:3] == (1, 0, "PRECOMMIT")
    out = [a for msg in relayed for a in peer.step(VoteReceived(msg))]
    assert ("timeout", "precommit", 0, TC.duration(PRECOMMIT, 0)) in summary(out, peer_key)  # L47


OPS = ["propA", "propB", "propA_pol", "validA", "validB", "invalidB", "t_propose", "t_prevote", "t_precommit",
       "t_rebroadcast", "pvA", "pvB", "pvNil", "pcA", "pcB", "pcNil", "polkaA", "polkaB", "polkaNil", "crash",
       "crash_torn"]


def op_events(op: str, m: Tendermint, me: bytes, i: int) -> list[Event]:
    """An operation resolved against the machine's current round, so that most operations reach a rule."""
    r = m.round
    others = [k for k in KEYS if k != me]
    who = others[i % 3]
    block = {"A": A, "B": B, "Nil": None}
    if op in ("propA", "propB"):
        return [proposal(r, A if op == "propA" else B)]
    if op == "propA_pol":
        return [proposal(r, A, pol=r - 1)] if r > 0 else []
    if op.startswith("valid") or op == "invalidB":
        return [ValueValidated(1, r, (A if op == "validA" else B).hash(), op != "invalidB")]
    if op.startswith("t_"):
        return [TimeoutFired(TimeoutKind(op[2:]), 1, r)]
    if op.startswith("polka"):
        return [vote(PV, r, block[op[5:]], k) for k in others[:2]] + ([vote(PV, r - 1, block[op[5:]], others[2])]
                                                                      if r > 0 else [])
    t = PV if op.startswith("pv") else PC
    return [vote(t, r, block[op[2:]], who)]


def restart(records: list[bytes], me: bytes) -> Tendermint:
    """The daemon's startup, as ChainStore.restorable_records does it: a torn last record is deleted from the store
    (before any new record is appended after it), then the machine is restored from the rest."""
    del records[Tendermint.check_records(records):]
    return Tendermint.restore(VS, me, sign(me), TC, records)


@settings(max_examples=examples(1000), deadline=None)
@given(ops=st.lists(st.sampled_from(OPS), min_size=12, max_size=60), me_index=st.integers(0, 3),
       tear_points=st.lists(st.integers(0, 3), min_size=8, max_size=8))
def test_no_double_sign_across_any_crash(ops: list[str], me_index: int, tear_points: list[int]) -> None:
    """Any schedule with crashes at any points (a crash may tear the record being written: nothing after it
    happens), each followed by a restart that restores from the store: the node never broadcasts two different
    messages for one (height, round, type). (Fails when restart keeps a torn record in the middle of the log.)"""
    me = KEYS[me_index]
    records: list[bytes] = []
    sent: list[Any] = []
    m = Tendermint(VS, me, sign(me), TC)
    perform(m.step(StartHeight(1)), records, sent)
    crashes = 0
    for i, op in enumerate(ops):
        if op in ("crash", "crash_torn"):
            m = restart(records, me)
            perform(m.step(StartHeight(1)), records, sent)
            continue
        tear = i + 1 < len(ops) and ops[i + 1] == "crash_torn"  # the crash lands inside this op's last write
        for ev in op_events(op, m, me, i):
            out = m.step(ev)
            n = sum(isinstance(a, Persist) for a in out)
            if tear and n:
                perform(out, records, sent, tear_points[crashes % 8] % n)
                crashes += 1
                break
            perform(out, records, sent)
    seen = own_signatures(sent, me)
    assert all(len(v) == 1 for v in seen.values()), seen


# ---------------------------------------------------------------- future heights


def test_future_height_messages_are_buffered_bounded_and_replayed() -> None:
    m = machine()
    # the next height's votes are kept and replayed at StartHeight
    for k in OTHERS:
        m.step(vote(PV, 0, None, k, h=2))
    m.step(vote(PV, 0, None, OTHERS[0], h=9))  # too far ahead: dropped
    assert len(m._future) == 3
    out = m.step(StartHeight(2))
    assert m.height == 2 and m.votes[0].power_for(PV, None) == 3 and m._future == []
    assert T(PREVOTE, 0) not in summary(out)  # not in step prevote yet
    assert m.step(vote(PV, 0, B, OTHERS[0], h=1)) == [] and m.votes[0].power_for(PV, B.hash()) == 0  # stale height
    # a flood is bounded
    for i in range(FUTURE_BUFFER + 500):
        m.step(vote(PV, i % 60, None, OTHERS[i % 3], h=3))
    assert len(m._future) <= FUTURE_BUFFER
    assert m.step(TimeoutFired(PROPOSE, 1, 0)) == [] and len(m._future) <= FUTURE_BUFFER  # a late timer: dropped
    assert m.dropped["duplicate"] >= FUTURE_BUFFER and m.dropped["future_height"] == 1  # and counted


@pytest.mark.parametrize("n", [4, 10])
def test_a_future_height_flood_fills_only_its_signers_share(n: int) -> None:
    keys = [hashlib.sha256(b"validator-%d" % i).digest() for i in range(n)]
    me, flooder, honest = keys[0], keys[1], keys[2:]
    m = Tendermint(ValidatorSet({k: 1 for k in keys}), me, sign(me), TC)
    m.step(StartHeight(1))
    share = FUTURE_BUFFER // (n + 2)
    slots = 2 * (MAX_ROUND_AHEAD + 1) * 2 * 2  # heights, rounds, vote types, two values each
    junk = [make_block(2, flooder, i) for i in range(3)]
    # every (height, round, type) and a third value each: at most two values per slot, at most `share` in all
    for h in (2, 3):
        for r in range(MAX_ROUND_AHEAD + 1):
            for blk in junk:
                m.step(vote(PV, r, blk, flooder, h=h))
                m.step(vote(PC, r, blk, flooder, h=h))
    assert len(m._future) == min(share, slots)
    # the honest validators' messages for the next height are still kept, and replayed at StartHeight
    for k in honest:
        m.step(vote(PV, 0, None, k, h=2))
        m.step(vote(PV, 0, None, k, h=2))  # a duplicate takes no room
    assert len(m._future) == min(share, slots) + len(honest)
    m.step(StartHeight(2))
    assert m.votes[0].power_for(PV, None) == len(honest)
    # the flooder's height-3 junk kept its place, counted again against its share
    assert 0 < len(m._future) <= share


def test_future_height_votes_beyond_max_round_ahead_are_dropped_when_buffered() -> None:
    m = machine()
    assert m.step(vote(PV, MAX_ROUND_AHEAD + 1, None, OTHERS[0], h=2)) == [] and m._future == []
    assert m.step(vote(PV, -1, None, OTHERS[0], h=2)) == [] and m._future == []
    m.step(vote(PV, MAX_ROUND_AHEAD, None, OTHERS[0], h=2))
    assert len(m._future) == 1  # round MAX_ROUND_AHEAD is still within reach of round 0 at height 2
    m.step(StartHeight(2))
    assert m.votes[MAX_ROUND_AHEAD].power_any(PV) == 1


def test_future_height_buffer_third_value_and_outsiders() -> None:
    m = machine()
    for blk in (A, B, None, A):
        m.step(vote(PC, 0, blk, OTHERS[0], h=2))
    assert len(m._future) == 2  # two values per (signer, height, round, type), as counted at that height
    m.step(proposal(0, A, h=2))
    m.step(proposal(0, B, h=2))
    m.step(proposal(0, make_block(2, P[0], 9), h=2))
    assert len(m._future) == 4
    # signers outside the validator set share one bucket, however many keys they make up
    share = FUTURE_BUFFER // (len(KEYS) + 2)
    for i in range(share + 50):
        m.step(vote(PV, 0, None, hashlib.sha256(b"sybil-%d" % i).digest(), h=2))
    assert len(m._future) == 4 + share
    m.step(vote(PV, 0, None, OTHERS[1], h=2))
    assert len(m._future) == 5 + share  # an honest validator still gets its place
    # the shell's own events (a block sync's commit) have their own share too
    h2 = make_block(2, P[0], 1)
    m.step(CommitReceived(h2, CommitCertificate(2, 0, h2.hash(), ())))
    assert len(m._future) == 6 + share


class _NoScan(dict):  # type: ignore[type-arg]
    """A dict the rule checks must not iterate: a flood's rounds ahead must not cost every event a scan."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("scanned")

    def items(self):  # type: ignore[no-untyped-def]
        raise AssertionError("scanned")

    def keys(self):  # type: ignore[no-untyped-def]
        raise AssertionError("scanned")


def test_rule_checks_never_scan_the_rounds_ahead() -> None:
    m = machine(SAW_A)
    for r in range(1, MAX_ROUND_AHEAD + 1):  # one validator's junk in every round ahead, proposals included
        m.step(vote(PV, r, None, OTHERS[0]))
        m.step(vote(PC, r, B, OTHERS[0]))
        if VS.proposer(1, r) != ME:
            m.step(proposal(r, B))
    assert len(m.votes) == MAX_ROUND_AHEAD + 1 and m.round == 0 and m._skip_round <= 0
    m.votes, m.proposal_values = _NoScan(m.votes), _NoScan(m.proposal_values)
    out = m.step(vote(PV, 0, A, OTHERS[1])) + m.step(vote(PV, 0, A, OTHERS[2]))
    assert summary(out) == [T(PREVOTE, 0), ("persist",), ("precommit", 0, "A")]  # L34, L36 as before
    out = m.step(vote(PC, 0, A, OTHERS[1])) + m.step(vote(PC, 0, A, OTHERS[2]))
    assert summary(out) == [("commit", "A", 0)]  # L49
    assert not any(isinstance(a, ValidateValue) for a in out)
