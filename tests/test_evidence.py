"""Equivocation evidence from consensus costs the validator reputation, exactly once."""

from __future__ import annotations

import pytest
from flnode.cli.node_cmd import _task_and_rules, make_genesis
from flnode.node.app import execute, genesis_state
from flnode.node.chain.execution import build_block
from flnode.protocol.crypto import NodeKey
from flnode.protocol.errors import ValidationError
from flnode.protocol.hashing import ZERO_HASH
from flnode.protocol.messages import DuplicateVoteEvidence, Vote, VoteType


def test_double_vote_is_punished_once() -> None:
    keys = [NodeKey.generate() for _ in range(4)]
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 2000)
    g = make_genesis("ev", [(f"n{i}", k.public_key) for i, k in enumerate(keys)], task, rules)
    bad = keys[2]
    a = Vote(VoteType.PREVOTE, 1, 0, b"\x01" * 32, bad.public_key).signed(bad, g.chain_id)
    b = Vote(VoteType.PREVOTE, 1, 0, b"\x02" * 32, bad.public_key).signed(bad, g.chain_id)
    ev = DuplicateVoteEvidence.of(a, b)
    s0 = genesis_state(g)
    block, s1, receipt = build_block(
        g, s0, prev_block_hash=ZERO_HASH, last_commit=None, proposer=keys[0].public_key, time_ms=0,
        candidates=[], evidence=[ev, ev],
    )
    assert block.evidence == (ev,)
    assert receipt.penalties == {bad.public_key: g.rules.rewards.penalty_equivocation}
    assert s1.reputation[bad.public_key] == g.rules.rewards.initial_reputation - g.rules.rewards.penalty_equivocation
    # the same equivocation proposed again is filtered by an honest proposer and makes a block invalid
    block2, s2, receipt2 = build_block(
        g, s1, prev_block_hash=block.hash(), last_commit=None, proposer=keys[0].public_key, time_ms=0,
        candidates=[], evidence=[ev],
    )
    assert block2.evidence == () and receipt2.penalties == {}
    with pytest.raises(ValidationError, match="already punished"):
        execute(g, s1, [], [ev])
    # forged evidence (a vote not signed by the accused) is refused
    forged = DuplicateVoteEvidence.of(a, Vote(VoteType.PREVOTE, 1, 0, b"\x03" * 32, bad.public_key, b"\x00" * 64))
    with pytest.raises(ValidationError):
        execute(g, s0, [], [forged])
