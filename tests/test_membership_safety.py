"""Open membership cannot be bought: outsiders get no free power, no unbounded weight, no unbounded state; the
rules of each attack, pure (one real-process network test is in test_censoring_and_sybil_network.py)."""

from __future__ import annotations

import pytest
from flnode.node.app import AppState, decode_state, encode_state, execute, genesis_state, validator_powers
from flnode.node.app import membership as mship
from flnode.node.app.membership import IDLE_HEIGHTS, PRUNE_AFTER, Refusal, tx_problem
from flnode.node.app.state import state_size_cap
from flnode.protocol.crypto import NodeKey
from flnode.protocol.errors import GenesisError, ProtocolError, ValidationError
from flnode.protocol.membership import MembershipTx, Role, TxKind
from test_membership import VALS, block, empty_blocks, genesis, join, refused, vote

OUT = [NodeKey(bytes([i + 1]) + bytes([0x55]) * 31) for i in range(40)]


def honest_share(g: object, s: AppState, height: int) -> float:
    powers = validator_powers(g, s, height)  # type: ignore[arg-type]
    honest = sum(p for k, p in powers.items() if k in {v.public_key for v in VALS})
    return honest / sum(powers.values())


def test_open_admission_gives_outsiders_no_power() -> None:
    """Attack 1: 9 outsiders ask for validator seats under open admission; before, 2 halted the chain and 9
    owned it. Now they wait for admit votes, and even admitted they stay under a third of the power."""
    g = genesis("open", max_members=64, max_joins_per_block=16)
    s = block(g, genesis_state(g), [join(g, k, role=Role.VALIDATOR) for k in OUT[:9]])
    s = empty_blocks(g, s, 3)
    assert all(k.public_key in s.membership.requests for k in OUT[:9])
    assert honest_share(g, s, s.height + 1) == 1.0
    # the validators admit them all: the cap keeps the admitted share below one third (4 genesis: one seat)
    for k in OUT[:9]:
        try:
            s = block(g, s, [vote(g, TxKind.ADMIT, v, k, s.height) for v in VALS[:3]])
        except Refusal as exc:
            assert exc.reason == "power_cap"
    s = empty_blocks(g, s, 3)
    powers = validator_powers(g, s, s.height + 1)
    admitted = sum(p for k, p in powers.items() if k not in {v.public_key for v in VALS})
    assert admitted == 1 and 3 * admitted < sum(powers.values())


def test_admitted_power_stays_under_the_cap_when_genesis_power_leaves() -> None:
    g = genesis("validators", n=4, max_admitted_power_percent=33)
    s = block(g, genesis_state(g), [join(g, OUT[0], role=Role.VALIDATOR)])
    s = block(g, s, [vote(g, TxKind.ADMIT, v, OUT[0], 1) for v in VALS[:3]])
    s = empty_blocks(g, s, 2)
    assert OUT[0].public_key in validator_powers(g, s, s.height + 1)
    s = block(g, s, [MembershipTx.leave(VALS[3], g.chain_id, s.height)])  # 1 of 4: still under a third
    s = empty_blocks(g, s, 2)
    assert OUT[0].public_key in validator_powers(g, s, s.height + 1)
    s = block(g, s, [MembershipTx.leave(VALS[2], g.chain_id, s.height)])  # 1 of 3: powerless while over
    s = empty_blocks(g, s, 2)
    assert OUT[0].public_key not in validator_powers(g, s, s.height + 1)


def test_open_membership_needs_caps_in_the_genesis() -> None:
    for missing in ({"max_members": 0}, {"max_samples_per_update": 0}):
        with pytest.raises(GenesisError, match="max_members and max_samples_per_update"):
            genesis("open", **missing)
    with pytest.raises(GenesisError, match="1/3"):
        genesis("open", max_admitted_power_percent=34)


def test_joiners_weight_is_bounded_by_the_genesis() -> None:
    """Attack 3: a joiner declared up to 2^40 samples; 5 joiners took FedAvg over."""
    g = genesis("open", max_members=64, max_samples_per_update=1000, max_recent_join_weight_percent=50,
                max_joins_per_block=16)
    s0 = genesis_state(g)
    refused(g, s0, [join(g, OUT[0], samples=1 << 40)], "samples_over_cap")
    # 4 genesis participants x 1000 samples x 50 %: two joiners at the cap, not a third
    s = block(g, s0, [join(g, k, samples=1000) for k in OUT[:2]])
    refused(g, s, [join(g, OUT[2], height=1, samples=1000)], "recent_weight_cap")
    s = empty_blocks(g, s, mship.RECENT_JOIN_HEIGHTS + mship.CHANGE_DELAY)
    assert block(g, s, [join(g, OUT[2], height=s.height, samples=1000)]).membership.members


def test_join_budget_per_block_and_refuse_votes() -> None:
    """Attack 6: 64 junk requests filled MAX_REQUESTS with no way to refuse one."""
    g = genesis("validators", max_members=64, max_joins_per_block=4)
    s0 = genesis_state(g)
    refused(g, s0, [join(g, k) for k in OUT[:5]], "join_budget")
    s = block(g, s0, [join(g, k) for k in OUT[:4]])
    assert len(s.membership.requests) == 4
    # one refusal is recorded; > 1/3 of the power refusing drops the request
    s = block(g, s, [vote(g, TxKind.REFUSE, VALS[0], OUT[0], 1)])
    assert s.membership.requests[OUT[0].public_key][1].against == {VALS[0].public_key}
    refused(g, s, [vote(g, TxKind.ADMIT, VALS[0], OUT[0], 2)], "already_voted")
    back = decode_state(encode_state(s), s.model)
    assert back.hash() == s.hash() and back.membership == s.membership
    s = block(g, s, [vote(g, TxKind.REFUSE, VALS[1], OUT[0], 2)])
    assert OUT[0].public_key not in s.membership.requests
    refused(g, s, [vote(g, TxKind.REFUSE, OUT[5], OUT[1], 3)], "not_validator")


def test_members_who_left_or_never_trained_are_pruned() -> None:
    """Attack 4: members were never pruned; junk members grew the state past its decode cap."""
    g = genesis("open", max_members=12, max_joins_per_block=8)
    s = block(g, genesis_state(g), [join(g, k) for k in OUT[:8]])
    assert len(s.membership.members) == 8
    s = block(g, s, [MembershipTx.leave(k, g.chain_id, 1) for k in OUT[:4]])
    s = empty_blocks(g, s, mship.CHANGE_DELAY + PRUNE_AFTER)
    assert len(s.membership.members) == 4 and not any(k.public_key in s.balances for k in OUT[:4])
    assert not any(k.public_key in s.membership.ended for k in OUT[:4])
    s = empty_blocks(g, s, IDLE_HEIGHTS)  # the other four never trained: ended, then pruned
    s = empty_blocks(g, s, mship.CHANGE_DELAY + PRUNE_AFTER)
    assert not s.membership.members and not s.membership.ended
    assert set(s.balances) == {v.public_key for v in VALS}
    # the seats are free again, and the encoded state stays under the cap that follows max_members
    assert len(encode_state(s)) < state_size_cap(g)
    with pytest.raises(ProtocolError):
        decode_state(b"\x91" + b"\x00" * (state_size_cap(g) + 1), s.model, state_size_cap(g))


def test_a_forged_tx_costs_no_copy_of_the_state() -> None:
    g = genesis("open")
    s = genesis_state(g)
    forged = MembershipTx(TxKind.JOIN, OUT[0].public_key, 0, OUT[0].public_key, 1, 10, "x", 1, bytes(64))

    def no_copy(*_: object, **__: object) -> None:
        raise AssertionError("apply_txs ran before the signature check")

    mp = pytest.MonkeyPatch()
    mp.setattr(mship, "apply_txs", no_copy)
    try:
        assert tx_problem(g, s, forged, validator_powers(g, s, 1)) == "bad_signature"
    finally:
        mp.undo()


def test_min_authors_is_block_validity() -> None:
    """Attack 2 (rule part): a proposer listing only its own update; with min_authors 2 such a block is invalid."""
    import numpy as np
    from flnode.node.app import task_for
    from flnode.protocol.hashing import digest
    from flnode.protocol.messages import UpdateAnnouncement
    from flnode.protocol.tensors import encode_tensors

    g = genesis("genesis", min_authors=2, max_members=0, max_samples_per_update=0)
    s = genesis_state(g)
    blob = encode_tensors({n: np.zeros(sh, np.float32) for n, sh in task_for(g.task).param_spec()})

    def ann(k: NodeKey) -> tuple[UpdateAnnouncement, bytes]:
        a = UpdateAnnouncement(1, s.model_hash, digest(blob), len(blob), 10, 0, 0, k.public_key)
        return a.signed(k, g.chain_id), blob

    with pytest.raises(ValidationError, match="min_authors"):
        execute(g, s, [ann(VALS[0])])
    assert execute(g, s, [ann(VALS[0]), ann(VALS[1])])[0].height == 1
    assert execute(g, s, [])[0].height == 1  # no updates at all: the model stays, the chain goes on
