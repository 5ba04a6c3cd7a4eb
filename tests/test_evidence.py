"""Equivocation evidence from consensus costs the validator reputation, exactly once."""

from __future__ import annotations

import pytest
from flnode.cli.node_cmd import _task_and_rules, make_genesis
from flnode.node.app import execute, genesis_state
from flnode.node.chain.execution import build_block
from flnode.protocol.crypto import NodeKey
from flnode.protocol.errors import DecodeError, ValidationError
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


def test_evidence_slashes_from_h_plus_2_and_enters_the_app_hash() -> None:
    from dataclasses import replace

    from flnode.node.app import decode_state, encode_state, validator_powers
    from flnode.protocol.encoding import pack, unpack

    keys = [NodeKey(bytes([i + 90]) * 32) for i in range(4)]
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 2000)
    g = make_genesis("slash", [(f"n{i}", k.public_key) for i, k in enumerate(keys)], task, rules)
    bad = keys[1]

    def double(h: int, r: int) -> DuplicateVoteEvidence:
        a = Vote(VoteType.PRECOMMIT, h, r, b"\x01" * 32, bad.public_key).signed(bad, g.chain_id)
        b = Vote(VoteType.PRECOMMIT, h, r, None, bad.public_key).signed(bad, g.chain_id)
        return DuplicateVoteEvidence.of(a, b)

    s0 = genesis_state(g)
    s1, _ = execute(g, s0, [], [])
    s2, _ = execute(g, s1, [], [double(1, 0)])  # evidence in block 2
    assert s1.slashed == {} and s2.slashed == {bad.public_key: 4}
    assert validator_powers(g, s2, 3) == g.powers
    assert validator_powers(g, s2, 4) == {k: 1 for k in g.powers if k != bad.public_key}
    with pytest.raises(ValueError):
        validator_powers(g, s0, 3)  # too old a state to know
    s3, _ = execute(g, s2, [], [double(1, 1)])  # a second conviction keeps the first effect height
    assert s3.slashed == {bad.public_key: 4}
    # the slashed map is in the app hash and the stored encoding; old 6-field states still decode
    assert replace(s2, slashed={}).hash() != s2.hash()
    assert decode_state(encode_state(s2), s2.model) == s2
    old = encode_state(s1)
    assert len(unpack(old)) == 6 and decode_state(old, s1.model) == s1
    with pytest.raises(DecodeError):
        decode_state(pack([*unpack(old), []]), s1.model)  # an empty 7th field is not canonical
