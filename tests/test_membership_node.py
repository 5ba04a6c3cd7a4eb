"""The node's side of open membership, in process: the CLI's outbox (sign at the node's height, send, re-send,
settle as committed or refused), the mempool, and the admission gate for membership transactions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from flnode.consensus import ValidatorSet
from flnode.node.admission import AdmissionGate
from flnode.node.app import AppState, execute, genesis_state
from flnode.node.app.membership import shard_of
from flnode.node.member_txs import DONE, MemberTxs, outbox_dir, write_intent
from flnode.node.metrics import Metrics
from flnode.protocol.genesis import Genesis
from flnode.protocol.membership import MembershipTx, Role, TxKind
from flnode.protocol.messages import UpdateAnnouncement, decode_gossip, encode_gossip
from test_membership import NEW, VALS, empty_blocks, genesis, join


def node(g: Genesis, tmp_path: Path) -> tuple[MemberTxs, list[AppState], list[MembershipTx]]:
    state, sent = [genesis_state(g)], []
    mt = MemberTxs(g, NEW[0], tmp_path, lambda: state[0], lambda data, h: sent.append(decode_gossip(data)))
    return mt, state, sent


def done_records(tmp_path: Path) -> list[str]:
    return [json.loads(p.read_text())["outcome"] for p in sorted((tmp_path / DONE).glob("*.json"))]


def test_outbox_signs_at_the_node_height_resends_and_settles(tmp_path: Path) -> None:
    g = genesis("open")
    mt, state, sent = node(g, tmp_path)
    state[0] = empty_blocks(g, state[0], 2)
    write_intent(tmp_path, {"kind": "join", "role": "trainer", "samples": 50, "moniker": "h", "data_seed": 3}, 1)
    assert mt.own_shard() == shard_of(g, 3)  # a joining trainer knows its data before it is admitted
    mt.outbox_pass(0.0)
    assert len(sent) == 1 and sent[0].kind == TxKind.JOIN and sent[0].height == 2 and mt.pending() == sent
    mt.outbox_pass(1.0)
    assert len(sent) == 1  # re-sent only every few seconds until a block carries it
    mt.outbox_pass(4.0)
    assert sent == [sent[0], sent[0]]
    state[0] = execute(g, state[0], [], (), [sent[0]])[0]
    mt.committed()
    assert mt.pending() == []
    mt.outbox_pass(5.0)
    assert not list(outbox_dir(tmp_path).glob("*.json")) and done_records(tmp_path) == ["committed"]
    assert mt.own_shard() == shard_of(g, 3)
    # a request the chain refuses: final only once the node is surely synced past the tx's height
    write_intent(tmp_path, {"kind": "admit", "target": VALS[0].public_key.hex()}, 2)
    mt.outbox_pass(6.0)
    assert len(list(outbox_dir(tmp_path).glob("*.json"))) == 1 and len(sent) == 2
    state[0] = empty_blocks(g, state[0], 3)
    mt.outbox_pass(7.0)
    assert done_records(tmp_path) == ["committed", "refused: not_validator"]  # only validators vote on seats
    write_intent(tmp_path, {"kind": "join", "role": "nobody"}, 3)  # malformed: dropped with a warning
    mt.outbox_pass(8.0)
    assert not list(outbox_dir(tmp_path).glob("*.json"))


def test_mempool_is_bounded_and_drops_what_a_block_carried(tmp_path: Path) -> None:
    g = genesis("open")
    mt, state, _ = node(g, tmp_path)
    a, b = join(g, NEW[1]), join(g, NEW[2])
    assert mt.problem(a) is None and mt.add(a) and not mt.add(a) and mt.add(b)
    assert mt.problem(replace(a, signature=bytes(64))) == "bad_signature"
    state[0] = execute(g, state[0], [], (), [a])[0]
    mt.committed()
    assert mt.pending() == [b] and mt.problem(a) == "duplicate"
    closed = genesis("genesis")
    assert MemberTxs(closed, NEW[0], None, lambda: genesis_state(closed), lambda d, h: None).problem(b) == \
        "membership_closed"


def test_mempool_offers_votes_and_leaves_before_joins_and_caps_joins(tmp_path: Path) -> None:
    """A flood of joins fills half the mempool at most, an admit vote that arrives after it is still pooled and
    offered first, and one tx per (signer, kind, target) is kept: a re-signed one replaces the earlier."""
    from flnode.node.member_txs import MAX_POOLED_JOINS
    from flnode.protocol.crypto import NodeKey
    from test_membership import vote

    g = genesis("validators", max_members=4 * MAX_POOLED_JOINS)
    mt, state, _ = node(g, tmp_path)
    flood = [join(g, NodeKey(i.to_bytes(2, "big") * 16)) for i in range(MAX_POOLED_JOINS + 10)]
    assert [mt.add(t) for t in flood].count(True) == MAX_POOLED_JOINS
    admit = vote(g, TxKind.ADMIT, VALS[0], NEW[1])
    assert mt.add(admit) and mt.pending()[0] == admit and len(mt.pending()) == MAX_POOLED_JOINS + 1
    state[0] = empty_blocks(g, state[0], 2)
    again = vote(g, TxKind.ADMIT, VALS[0], NEW[1], height=2)
    assert not mt.add(admit) and mt.add(again) and not mt.add(admit)
    assert mt.pending()[0] == again and admit not in mt.pending()


class View:
    def __init__(self, g: Genesis, mt: MemberTxs) -> None:
        self.g, self.mt = g, mt

    def next_height(self) -> int:
        return 1

    def consensus_round(self) -> int:
        return 0

    def validator_set(self, height: int) -> ValidatorSet | None:
        return ValidatorSet(self.g.powers)

    def announcement_problem(self, ann: UpdateAnnouncement) -> str | None:
        return None

    def membership_problem(self, tx: MembershipTx) -> str | None:
        return self.mt.problem(tx)


def test_gate_admits_membership_txs_by_the_block_rules(tmp_path: Path) -> None:
    g = genesis("open")
    mt, _, _ = node(g, tmp_path)
    gate = AdmissionGate(g.chain_id, "c", "u", View(g, mt), Metrics(), lambda: 0.0, max_bytes={"c": 1 << 20, "u": 1 << 20})
    tx = MembershipTx.join(NEW[1], g.chain_id, 0, Role.TRAINER, 10, "x", 1)
    assert gate.admit("u", encode_gossip(tx), "peer") == tx  # on gossip
    assert gate.admit(None, encode_gossip(join(g, NEW[2])), "peer") is not None  # on a validator's direct link
    assert gate.admit("u", encode_gossip(replace(tx, moniker="y")), "peer") is None
    assert gate.last_reason == "bad_signature"
    assert gate.admit("u", encode_gossip(MembershipTx.join(NEW[3], g.chain_id, 5, Role.TRAINER, 10, "x", 1)),
                      "peer") is None
    assert gate.last_reason == "future_height"
