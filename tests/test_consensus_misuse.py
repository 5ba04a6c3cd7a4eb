"""The machine tells a shell bug from network noise: an input the node's own shell cannot have produced raises
ShellMisuse; a late timer or answer is dropped; a remote message that cannot count is dropped and counted by reason.
Step tables, as in test_consensus_rules."""

from __future__ import annotations

from dataclasses import replace

import pytest
from flnode.consensus import (
    CommitReceived,
    Event,
    ProposalReceived,
    ShellMisuse,
    StartHeight,
    Tendermint,
    TimeoutFired,
    ValueReady,
    ValueValidated,
)
from flnode.consensus.sim import make_block
from flnode.protocol.messages import CommitCertificate, Proposal
from test_consensus_rules import (
    KEYS,
    ME,
    OTHERS,
    PC,
    PRECOMMIT,
    PREVOTE,
    PROPOSE,
    PV,
    TC,
    VS,
    A,
    P,
    machine,
    proposal,
    sign,
    valid,
    vote,
)

OTHER_HEIGHT = make_block(2, P[0], 1)
CERT_A = CommitCertificate(1, 0, A.hash(), ())
NOT_P0 = next(k for k in KEYS if k != P[0])  # any validator but the proposer of height 1, round 0

MISUSE = [
    # (case, the machine's proposer key, events before, the impossible input, what the error says)
    ("a timeout for a round the machine has not reached", ME, [], TimeoutFired(PREVOTE, 1, 3), "round 3"),
    ("a timeout for a height not started", ME, [], TimeoutFired(PROPOSE, 2, 0), "height 2"),
    ("a value for a later round", P[0], [], ValueReady(1, 1, A), "round 1"),
    ("a value for a later height", P[0], [], ValueReady(2, 0, OTHER_HEIGHT), "height 2"),
    ("a value whose block is of another height", P[0], [], ValueReady(1, 0, OTHER_HEIGHT), "block of height 2"),
    ("a value for a round this node does not propose", ME, [], ValueReady(1, 0, A), "does not propose"),
    ("a verdict for a height the machine never asked about", ME, [], ValueValidated(2, 0, A.hash(), True),
     "verdict for height 2"),
    ("a commit whose certificate is for another block", ME, [],
     CommitReceived(A, replace(CERT_A, block_hash=b"\x01" * 32)), "another block"),
    ("a commit whose certificate is for another height", ME, [], CommitReceived(A, replace(CERT_A, height=2)),
     "another block"),
    ("a height going back", ME, [StartHeight(2)], StartHeight(1), "heights only go up"),
]


@pytest.mark.parametrize("case, me, before, event, says", MISUSE, ids=[m[0] for m in MISUSE])
def test_shell_misuse_raises(case: str, me: bytes, before: list[Event], event: Event, says: str) -> None:
    m = machine(before, me=me)
    with pytest.raises(ShellMisuse, match=says):
        m.step(event)


def test_a_timeout_before_the_first_height_is_misuse() -> None:
    m = Tendermint(VS, ME, sign(ME), TC)
    with pytest.raises(ShellMisuse, match="not started"):
        m.step(TimeoutFired(PROPOSE, 0, 0))


LATE = [
    # (case, events before, an input that is merely late: dropped, nothing happens)
    ("a timer of a round the machine has left", [TimeoutFired(PROPOSE, 1, 0), TimeoutFired(PREVOTE, 1, 0),
                                                 TimeoutFired(PRECOMMIT, 1, 0)],
     TimeoutFired(PREVOTE, 1, 0)),
    ("a value built after its round timed out", [TimeoutFired(PROPOSE, 1, 0), TimeoutFired(PREVOTE, 1, 0),
                                                 TimeoutFired(PRECOMMIT, 1, 0)],
     ValueReady(1, 0, A)),
    ("a verdict for a past height", [StartHeight(2)], valid(A)),
    ("a timer of a past height", [StartHeight(2)], TimeoutFired(PREVOTE, 1, 0)),
]


@pytest.mark.parametrize("case, before, event", LATE, ids=[c[0] for c in LATE])
def test_late_shell_inputs_are_dropped(case: str, before: list[Event], event: Event) -> None:
    m = machine(before, me=P[0])
    at = (m.height, m.round, m.current_step)
    assert m.step(event) == []
    assert (m.height, m.round, m.current_step) == at


NOISE = [
    # (case, events before, a remote message that cannot count, the reason it is counted under)
    ("a vote of an earlier height", [StartHeight(2)], vote(PV, 0, A, OTHERS[0]), "stale_height"),
    ("a vote far ahead in rounds", [], vote(PV, 65, None, OTHERS[0]), "round_out_of_range"),
    ("a vote by a key outside the set", [], vote(PV, 0, None, b"\x07" * 32), "not_a_validator"),
    ("the same vote twice", [vote(PV, 0, None, OTHERS[0])], vote(PV, 0, None, OTHERS[0]), "duplicate"),
    ("a proposal by the wrong proposer", [], ProposalReceived(Proposal(1, 0, -1, A, NOT_P0)), "not_the_proposer"),
    ("a proposal whose proof-of-lock round is not below its round", [], proposal(0, A, pol=0), "bad_pol_round"),
    ("a precommit after the decision", [proposal(0, A), valid(A), *(vote(PC, 0, A, k) for k in OTHERS)],
     vote(PC, 0, A, ME), "decided"),
    ("a vote three heights ahead", [], vote(PV, 0, None, OTHERS[0], h=4), "future_height"),
]


@pytest.mark.parametrize("case, before, event, reason", NOISE, ids=[c[0] for c in NOISE])
def test_remote_noise_is_dropped_and_counted(case: str, before: list[Event], event: Event, reason: str) -> None:
    m = machine(before)
    counted = m.dropped[reason]
    assert m.step(event) == []
    assert m.dropped[reason] == counted + 1
