"""Open membership, the pure part: every transaction's rules, the h+2 delay, the header binding, and
that a genesis without it keeps its hashes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flnode.cli.node_cmd import _task_and_rules, make_genesis
from flnode.node.app import (
    AppState,
    Reason,
    check_announcement,
    decode_state,
    encode_state,
    execute,
    genesis_state,
    task_for,
    validator_powers,
)
from flnode.node.app.blocks import build_block, check_block, select_txs
from flnode.node.app.membership import Refusal, trains_at
from flnode.node.chain.verify import genesis_block_hash
from flnode.protocol.crypto import NodeKey
from flnode.protocol.errors import DecodeError, GenesisError, ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest
from flnode.protocol.membership import TX_TTL, MembershipTx, Role, TxKind
from flnode.protocol.messages import Block, UpdateAnnouncement, decode_gossip, encode_gossip, list_hash
from flnode.protocol.tensors import encode_tensors

VALS = [NodeKey(bytes([i + 200]) * 32) for i in range(4)]
NEW = [NodeKey(bytes([i + 220]) * 32) for i in range(4)]


def genesis(admission: str = "open", n: int = 4, **rules: object) -> Genesis:
    task, r = _task_and_rules("logreg", "synthetic", "iid", 0.5, "fedavg", 0, 1e6, 1, 0.1, 2000)
    r.update(admission=admission, max_members=16, max_samples_per_update=1000, max_recent_join_weight_percent=100)
    r.update(rules)
    return make_genesis("members", [(f"v{i}", k.public_key) for i, k in enumerate(VALS[:n])], task, r)


def join(g: Genesis, k: NodeKey, height: int = 0, role: Role = Role.TRAINER, samples: int = 100) -> MembershipTx:
    return MembershipTx.join(k, g.chain_id, height, role, samples, f"m{k.public_key[0]}", k.public_key[0])


def vote(g: Genesis, kind: TxKind, by: NodeKey, target: NodeKey, height: int = 0) -> MembershipTx:
    return MembershipTx.vote(kind, by, g.chain_id, height, target.public_key)


def block(g: Genesis, s: AppState, txs: list[MembershipTx]) -> AppState:
    """Execute one block carrying `txs` (no updates); every tx must be valid."""
    return execute(g, s, [], (), txs)[0]


def refused(g: Genesis, s: AppState, txs: list[MembershipTx], reason: str) -> None:
    with pytest.raises(Refusal) as exc:
        execute(g, s, [], (), txs)
    assert exc.value.reason == reason


def empty_blocks(g: Genesis, s: AppState, n: int) -> AppState:
    for _ in range(n):
        s = block(g, s, [])
    return s


def test_default_genesis_and_chain_unchanged() -> None:
    """Policy genesis (the default): no new genesis field, no new header or state field, and every tx refused."""
    task, r = _task_and_rules("logreg", "synthetic", "iid", 0.5, "fedavg", 0, 1e6, 1, 0.1, 2000)
    g = make_genesis("members", [(f"v{i}", k.public_key) for i, k in enumerate(VALS)], task, r)
    assert b"admission" not in g.canonical_bytes() and b"max_members" not in g.canonical_bytes()
    assert b"admission" in genesis().canonical_bytes()
    s0 = genesis_state(g)
    b1, s1, _ = build_block(g, s0, prev_block_hash=genesis_block_hash(g), last_commit=None,
                            proposer=VALS[0].public_key, time_ms=0, candidates=[], txs=[join(g, NEW[0])])
    assert b1.txs == () and b1.header.txs_hash is None and len(b1.to_list()) == 4 and len(b1.header.to_list()) == 10
    assert len(encode_state_fields(s1)) == 6  # the old state layout, so the old app hash
    refused(g, s0, [join(g, NEW[0])], "membership_closed")
    with pytest.raises(GenesisError, match="admission"):
        genesis(admission="anyone")


def encode_state_fields(s: AppState) -> list[object]:
    from flnode.protocol.encoding import unpack

    out = unpack(encode_state(s))
    assert isinstance(out, list)
    return out


def test_open_join_counts_from_h_plus_2_and_binds_to_the_header() -> None:
    g = genesis("open")
    s0 = genesis_state(g)
    tx_t, tx_v = join(g, NEW[0]), join(g, NEW[1], role=Role.VALIDATOR)
    b1, s1, _ = build_block(g, s0, prev_block_hash=genesis_block_hash(g), last_commit=None,
                            proposer=VALS[0].public_key, time_ms=0, candidates=[], txs=[tx_t, tx_v])
    assert b1.txs == (tx_t, tx_v) and b1.header.txs_hash == list_hash([tx_t, tx_v])
    assert Block.decode(b1.encode()) == b1
    check_block(g, s0, b1, {}, prev_block_hash=genesis_block_hash(g))  # a validator re-executes it alike
    t = NEW[0].public_key
    assert s1.reputation[t] == g.rules.rewards.initial_reputation and s1.balances[t] == 0
    assert not trains_at(g, s1, t, 2) and trains_at(g, s1, t, 3)
    # open admission admits trainers only: a validator seat waits for > 2/3 of the power to admit it
    v = NEW[1].public_key
    assert v in s1.membership.requests and v not in s1.membership.members
    assert v not in validator_powers(g, s1, 3)
    s1v = block(g, s1, [vote(g, TxKind.ADMIT, k, NEW[1], 1) for k in VALS[:3]])
    assert not trains_at(g, s1v, v, 4)  # a validator-only member does not train
    assert v not in validator_powers(g, s1v, 3) and validator_powers(g, s1v, 4)[v] == g.rules.member_power
    assert t not in validator_powers(g, s1, 3)  # a trainer never votes
    # the state survives the store's encoding and its hash covers the membership
    s1b = decode_state(encode_state(s1), s1.model)
    assert s1b.hash() == s1.hash() and s1b.membership == s1.membership
    assert s1.hash() != replace(s1, membership=s0.membership).hash()
    # a body whose transactions do not match the header does not decode, and swapped lists do not either
    swapped = b1.to_list()
    swapped[4] = [tx_t.to_list()]
    with pytest.raises(DecodeError, match="membership"):
        Block.from_list(swapped)
    with pytest.raises(DecodeError):
        Block.from_list([*b1.to_list()[:4], []])  # an empty list is not encoded
    unbound = replace(b1, header=replace(b1.header, txs_hash=None))
    with pytest.raises(DecodeError, match="membership"):
        Block.from_list(unbound.to_list())


def test_joined_trainer_updates_bounded_by_its_declared_count() -> None:
    g = genesis("open")
    s = empty_blocks(g, block(g, genesis_state(g), [join(g, NEW[0], samples=50)]), 1)
    assert s.height == 2
    k = NEW[0]

    def ann(samples: int, state: AppState) -> UpdateAnnouncement:
        blob = encode_tensors({n: np.zeros(sh, np.float32) for n, sh in task_for(g.task).param_spec()})
        a = UpdateAnnouncement(state.height + 1, state.model_hash, digest(blob), len(blob), samples, 0, 0, k.public_key)
        return a.signed(k, g.chain_id)

    s1 = genesis_state(g)
    assert check_announcement(g, s1, ann(10, s1)) == Reason.NOT_PARTICIPANT  # not a member yet
    assert check_announcement(g, s, ann(50, s)) is None
    assert check_announcement(g, s, ann(51, s)) == Reason.SAMPLES_OVER_CAP


def test_bad_signature_duplicate_and_replay() -> None:
    g = genesis("open")
    s0 = genesis_state(g)
    tx = join(g, NEW[0], height=0)
    refused(g, s0, [replace(tx, signature=bytes(64))], "bad_signature")
    refused(g, s0, [replace(tx, samples=101)], "bad_signature")  # a changed field breaks the signature
    refused(g, s0, [tx, tx], "duplicate")
    s1 = block(g, s0, [tx])
    refused(g, s1, [tx], "duplicate")  # replayed in a later block
    refused(g, s1, [join(g, NEW[0], height=1)], "already_member")  # a fresh join from a member
    other = MembershipTx.join(NEW[1], "another-chain", 0, Role.TRAINER, 10, "x", 1)
    refused(g, s0, [other], "bad_signature")  # signed for another chain
    refused(g, s0, [join(g, NEW[1], height=1)], "future_height")
    late = empty_blocks(g, s0, TX_TTL)
    refused(g, late, [join(g, NEW[1], height=0)], "expired")
    assert block(g, late, [join(g, NEW[1], height=TX_TTL)]).membership.members


def test_validators_policy_needs_more_than_two_thirds_of_the_power() -> None:
    g = genesis("validators")
    s = block(g, genesis_state(g), [join(g, NEW[0], role=Role.BOTH)])
    target = NEW[0].public_key
    assert target in s.membership.requests and target not in s.membership.members
    refused(g, s, [vote(g, TxKind.ADMIT, NEW[1], NEW[0], 1)], "not_validator")  # a non-member admitter
    refused(g, s, [vote(g, TxKind.ADMIT, VALS[0], NEW[1], 1)], "no_request")
    s = block(g, s, [vote(g, TxKind.ADMIT, VALS[0], NEW[0], 1), vote(g, TxKind.ADMIT, VALS[1], NEW[0], 1)])
    assert target not in s.membership.members  # 2 of 4: not more than 2/3
    refused(g, s, [vote(g, TxKind.ADMIT, VALS[0], NEW[0], 2)], "already_voted")
    s = block(g, s, [vote(g, TxKind.ADMIT, VALS[2], NEW[0], 2)])
    assert s.height == 3 and s.membership.members[target].since == 5 and not s.membership.requests
    assert target not in validator_powers(g, s, 4) and target in validator_powers(g, s, 5)
    assert trains_at(g, s, target, 5)
    # an admitted trainer-only member cannot admit: it has no voting power
    s = block(g, s, [join(g, NEW[1], height=3, role=Role.TRAINER)])
    s = block(g, s, [vote(g, TxKind.ADMIT, k, NEW[1], 4) for k in VALS[:3]])
    assert NEW[1].public_key in s.membership.requests  # 3 of 5 now that NEW[0] votes too: not enough
    s = empty_blocks(g, block(g, s, [vote(g, TxKind.ADMIT, NEW[0], NEW[1], 5)]), 2)
    assert trains_at(g, s, NEW[1].public_key, s.height + 1)
    s = block(g, s, [join(g, NEW[2], height=s.height)])
    refused(g, s, [vote(g, TxKind.ADMIT, NEW[1], NEW[2], s.height)], "not_validator")
    go = genesis("open")
    refused(go, genesis_state(go), [vote(go, TxKind.ADMIT, VALS[0], NEW[0])], "no_request")


def test_cap_reached() -> None:
    g = genesis("open", max_members=5)
    s0 = genesis_state(g)
    refused(g, s0, [join(g, NEW[0]), join(g, NEW[1])], "cap_reached")
    s1 = block(g, s0, [join(g, NEW[0])])
    refused(g, s1, [join(g, NEW[1], height=1)], "cap_reached")
    s2 = block(g, s1, [MembershipTx.leave(NEW[0], g.chain_id, 1)])  # leaving frees the seat
    assert block(g, s2, [join(g, NEW[1], height=2)]).membership.members[NEW[1].public_key].since == 5
    gv = genesis("validators", max_members=5)
    sv = block(gv, genesis_state(gv), [join(gv, NEW[0]), join(gv, NEW[1])])  # requests do not take seats
    sv = block(gv, sv, [vote(gv, TxKind.ADMIT, k, NEW[0], 1) for k in VALS[:3]])
    refused(gv, sv, [vote(gv, TxKind.ADMIT, k, NEW[1], 2) for k in VALS[:3]], "cap_reached")


def test_leave_twice_and_last_validator() -> None:
    g = genesis("open")
    s1 = block(g, genesis_state(g), [join(g, NEW[0])])
    s2 = block(g, s1, [MembershipTx.leave(NEW[0], g.chain_id, 1)])
    assert s2.membership.ended[NEW[0].public_key] == 4
    assert trains_at(g, s2, NEW[0].public_key, 3) and not trains_at(g, s2, NEW[0].public_key, 4)
    refused(g, s2, [MembershipTx.leave(NEW[0], g.chain_id, 2)], "not_member")  # leave twice
    refused(g, s2, [join(g, NEW[0], height=2)], "left_member")  # the key cannot come back
    refused(g, s1, [MembershipTx.leave(NEW[1], g.chain_id, 1)], "not_member")
    # a genesis validator may leave, with the same delay; the last one may not
    s3 = block(g, s2, [MembershipTx.leave(VALS[3], g.chain_id, 2)])
    assert VALS[3].public_key in validator_powers(g, s3, 4) and VALS[3].public_key not in validator_powers(g, s3, 5)
    g1 = genesis("open", n=1)
    refused(g1, genesis_state(g1), [MembershipTx.leave(VALS[0], g1.chain_id, 0)], "last_validator")


def test_remove_needs_a_quorum_and_refuses_the_removed() -> None:
    g = genesis("open")
    s = empty_blocks(g, block(g, genesis_state(g), [join(g, NEW[0])]), 1)
    t = NEW[0]
    refused(g, s, [vote(g, TxKind.REMOVE, NEW[0], VALS[0], 2)], "not_validator")
    refused(g, s, [vote(g, TxKind.REMOVE, VALS[0], NEW[1], 2)], "not_member")
    s = block(g, s, [vote(g, TxKind.REMOVE, VALS[0], t, 2), vote(g, TxKind.REMOVE, VALS[1], t, 2)])
    assert trains_at(g, s, t.public_key, 10) and s.membership.removals[t.public_key].votes
    s = block(g, s, [vote(g, TxKind.REMOVE, VALS[3], t, 3)])
    assert s.height == 4 and s.membership.ended[t.public_key] == 6 and not s.membership.removals
    assert trains_at(g, s, t.public_key, 5) and not trains_at(g, s, t.public_key, 6)
    # a removed validator's power ends at the same delay
    s = block(g, s, [vote(g, TxKind.REMOVE, k, VALS[3], 4) for k in VALS[:3]])
    assert VALS[3].public_key in validator_powers(g, s, 6) and VALS[3].public_key not in validator_powers(g, s, 7)


def test_proposer_skips_invalid_txs_and_wire_form_is_canonical() -> None:
    g = genesis("open")
    s0 = genesis_state(g)
    good = join(g, NEW[0])
    chosen = select_txs(g, s0, [replace(good, signature=bytes(64)), good, good, join(g, NEW[1], height=5)])
    assert chosen == (good,)
    assert decode_gossip(encode_gossip(good)) == good
    bad_leave = MembershipTx(TxKind.LEAVE, NEW[0].public_key, 0, NEW[0].public_key, role=1, signature=bytes(64))
    with pytest.raises(DecodeError, match="only a join"):
        MembershipTx.from_list(bad_leave.to_list())
    with pytest.raises(DecodeError, match="signer"):
        MembershipTx.from_list(replace(good, target=NEW[1].public_key).to_list())
    with pytest.raises(DecodeError):
        MembershipTx.decode(good.encode() + b"\x00")
    assert len(good.encode()) <= MembershipTx.MAX_SIZE
    with pytest.raises(ValidationError):
        execute(g, s0, [], (), [good] * 65)


def test_proposer_priority_carried_across_set_changes() -> None:
    from flnode.consensus import ValidatorSet

    keys = [bytes([i]) * 32 for i in range(1, 6)]
    base = ValidatorSet(dict.fromkeys(keys[:4], 1))
    same = ValidatorSet.carried(base, base.powers, 7)  # priorities centred and in the window: nothing moves
    assert [same.proposer(h, r) for h in range(7, 40) for r in range(3)] == \
           [base.proposer(h, r) for h in range(7, 40) for r in range(3)]
    grown = ValidatorSet.carried(base, {**base.powers, keys[4]: 1}, 7)
    seq = [grown.proposer(h, 0) for h in range(7, 57)]
    assert keys[4] not in seq[:4]  # a newcomer starts at -1.125 x total power: it waits its turn
    assert max(map(seq.count, keys)) - min(map(seq.count, keys)) <= 2  # then the round robin is fair again
    rebuilt = ValidatorSet.from_schedule([(1, base.powers), (7, grown.powers)])  # what every node computes
    assert [rebuilt.proposer(h, 0) for h in range(7, 57)] == seq
    with pytest.raises(ValueError):
        grown.proposer(6, 0)
    heavy = ValidatorSet.carried(grown, {**grown.powers, keys[0]: 100}, 20)  # rescaled into the window
    assert [heavy.proposer(h, 0) for h in range(20, 120)].count(keys[0]) > 90


def test_stored_proposer_sets_give_the_replayed_proposers() -> None:
    """The state stores each set with its priorities (rolled each height), and its proposers are those of the
    full replay from height 1 over every change, which no node needs to run any more."""
    from flnode.consensus import ValidatorSet
    from flnode.node.app.powers import proposer_sets, set_at

    g = genesis("open")
    s = block(g, genesis_state(g), [join(g, NEW[0], role=Role.VALIDATOR), join(g, NEW[1])])  # block 1
    s = block(g, s, [vote(g, TxKind.ADMIT, k, NEW[0], 1) for k in VALS[:3]])  # block 2: NEW[0] from 4
    s = block(g, s, [MembershipTx.leave(VALS[3], g.chain_id, 2)])  # block 3: VALS[3] ends at 5
    states = [s]
    for _ in range(12):
        states.append(block(g, states[-1], []))
    gp = {k.public_key: 1 for k in VALS}
    with_new = {**gp, NEW[0].public_key: 1}
    without = dict(with_new)
    del without[VALS[3].public_key]
    schedule = [(1, gp), (4, with_new), (5, without)]

    def replayed(h: int) -> ValidatorSet:
        return ValidatorSet.from_schedule([c for c in schedule if c[0] <= h])
    for st in states:
        sets = proposer_sets(g, st)
        assert len(sets) <= 3 and sets[0][0] == st.height  # bounded: no history kept
        for h in range(st.height, st.height + 3):
            assert [set_at(sets, h).proposer(h, r) for r in range(4)] == [replayed(h).proposer(h, r) for r in range(4)]
    again = decode_state(encode_state(states[-1]), states[-1].model)
    assert again.proposers == states[-1].proposers and again.hash() == states[-1].hash()


def test_open_membership_refuses_dp_for_now() -> None:
    with pytest.raises(GenesisError, match="differential privacy"):
        genesis("open", dp_mode="record")
