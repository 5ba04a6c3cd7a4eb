"""Equivocation evidence from consensus costs the validator reputation, exactly once."""

from __future__ import annotations

import pytest
from flnode.cli.node_cmd import _task_and_rules, make_genesis
from flnode.node.app import execute, genesis_state
from flnode.node.app.blocks import build_block
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


def _double(key: NodeKey, chain_id: str, height: int, rnd: int = 0) -> DuplicateVoteEvidence:
    a = Vote(VoteType.PREVOTE, height, rnd, b"\x01" * 32, key.public_key).signed(key, chain_id)
    b = Vote(VoteType.PREVOTE, height, rnd, b"\x02" * 32, key.public_key).signed(key, chain_id)
    return DuplicateVoteEvidence.of(a, b)


def test_evidence_pool_one_equivocator_cannot_crowd_out_another() -> None:
    """70 double votes of one validator take its per-validator cap, not the pool: a second equivocator's evidence
    is still pooled and proposed; punished keys leave at commit and are not pooled again."""
    from flnode.node.pool import EVIDENCE_MAX, EVIDENCE_PER_VALIDATOR, EvidencePool

    keys = [NodeKey.generate() for _ in range(4)]
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 2000)
    g = make_genesis("ev", [(f"n{i}", k.public_key) for i, k in enumerate(keys)], task, rules)
    pool, s0 = EvidencePool(), genesis_state(g)
    flood = [_double(keys[1], g.chain_id, 1, r) for r in range(EVIDENCE_MAX + 6)]
    reasons = [pool.add(ev, s0.punished, s0.height) for ev in flood]
    assert reasons.count(None) == EVIDENCE_PER_VALIDATOR and set(reasons[EVIDENCE_PER_VALIDATOR:]) == {"validator_cap"}
    assert pool.add(flood[0], s0.punished, s0.height) == "duplicate"
    other = _double(keys[2], g.chain_id, 1)
    assert pool.add(other, s0.punished, s0.height) is None
    block, s1, _ = build_block(g, s0, prev_block_hash=ZERO_HASH, last_commit=None, proposer=keys[0].public_key,
                               time_ms=0, candidates=[], evidence=pool.pending())
    assert {e.validator for e in block.evidence} == {keys[1].public_key, keys[2].public_key}
    pool.committed(s1.punished, s1.height, lambda k: True)
    assert pool.pending() == []  # what the block punished left the pool
    assert pool.add(other, s1.punished, s1.height) == "punished"
    assert pool.add(flood[-1], s1.punished, s1.height) is None  # another key of the same validator: still news


def test_evidence_pool_drops_stale_and_unpunishable_pieces() -> None:
    from flnode.node.pool import EVIDENCE_MAX_AGE, EvidencePool

    k = NodeKey.generate()
    pool = EvidencePool()
    assert pool.add(_double(k, "c", 5), frozenset(), 5 + EVIDENCE_MAX_AGE + 1) == "stale"
    assert pool.add(_double(k, "c", 5), frozenset(), 5 + EVIDENCE_MAX_AGE) is None
    pool.committed(frozenset(), 6 + EVIDENCE_MAX_AGE, lambda key: True)
    assert pool.pending() == []
    assert pool.add(_double(k, "c", 7), frozenset(), 7) is None
    pool.committed(frozenset(), 8, lambda key: key != k.public_key)  # left and pruned: no longer punishable
    assert pool.pending() == []
