"""A Byzantine validator of four (tests/byzantine_node.py) censors honest updates when it proposes and asks
for dozens of validator and trainer seats for fresh keys, on a real open-membership network on 127.0.0.1.

Its own-only blocks get no prevote (the next round's proposer commits an honest block instead), no outsider
gets any voting power, and the honest nodes keep committing, agree on every model and pass chain verify.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flnode.cli.demo import NodeView, free_ports, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet, open_membership_rules
from flnode.node.app import validator_powers
from flnode.protocol.genesis import Genesis
from flnode.protocol.membership import Role, TxKind
from netutil import heights, read_store
from test_byzantine_member import check_honest, counters, start_byzantine, wait_until

pytestmark = pytest.mark.slow


def chain_facts(home: Path, genesis: Genesis, top: int) -> tuple[list[tuple[int, bytes, set[bytes]]], list, dict]:
    def read(s):  # type: ignore[no-untyped-def]
        blocks = [s.get_block(h) for h in range(1, top + 1)]
        state = s.get_state(top)
        return blocks, state

    blocks, state = read_store(home, read)
    rows = [(b.height, b.header.proposer, {u.author for u in b.updates}) for b in blocks]
    joins = [t for b in blocks for t in b.txs if t.kind == TxKind.JOIN]
    return rows, joins, {"powers": validator_powers(genesis, state, top + 1), "state": state}


async def test_censoring_proposer_and_sybil_joins_fail(tmp_path: Path) -> None:
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 1000)
    rules.update(open_membership_rules(task, 4, "open"))
    rules.update(timeout_propose_ms=1500, timeout_propose_delta_ms=300, timeout_prevote_ms=500,
                 timeout_prevote_delta_ms=200, timeout_precommit_ms=500, timeout_precommit_delta_ms=200)
    create_testnet(tmp_path, 4, chain_id="censor-4", host="127.0.0.1", listen_host="127.0.0.1",
                   ports=free_ports(4), task_rules=(task, rules), force=True)
    genesis = Genesis.load(tmp_path / "node0" / "genesis.json")
    views = [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(4)]
    honest, byz = views[:3], views[3]
    byz_key = genesis.validators[3].key_bytes
    procs = [start_node(v.home) for v in honest] + [start_byzantine(byz.home, "censor,sybil")]
    t0 = time.monotonic()

    def censored_and_seen() -> bool:
        try:
            return (counters(byz.home).get("byz_censored", 0) >= 2
                    and sum(counters(v.home).get("proposals_unfair", 0) for v in honest) >= 2)
        except (OSError, ValueError, KeyError):
            return False

    try:
        await wait_until(lambda: min(heights(honest)) >= 10, views, procs, 90)
        await wait_until(censored_and_seen, views, procs, max(5.0, 110 - (time.monotonic() - t0)))
        assert all(p.poll() is None for p in procs)
    finally:
        stop_nodes(procs)
    top = check_honest(genesis, honest, 10)
    rows, joins, facts = chain_facts(honest[0].home, genesis, top)
    # censoring: no committed block is the Byzantine proposer's own-only block while others trained
    own_only = [h for h, proposer, authors in rows if proposer == byz_key and authors == {byz_key}]
    assert not own_only, f"own-only blocks committed at {own_only}"
    assert all(len(a) >= 3 for h, _, a in rows if h >= 3), rows  # every honest update of every height got in
    # sybil: its joins reached the chain, yet the power is the genesis validators' alone
    sybil_joins = [t for t in joins if t.moniker.startswith("sybil")]
    assert any(t.role == Role.VALIDATOR for t in sybil_joins), "no sybil validator join was committed"
    genesis_keys = {v.key_bytes for v in genesis.validators}
    assert set(facts["powers"]) <= genesis_keys, facts["powers"]
    members = facts["state"].membership.members
    assert all(m.power == 0 for m in members.values()), members
    assert len(members) <= genesis.rules.max_members
    print(f"censor+sybil: {top} heights in {time.monotonic() - t0:.1f} s; {len(sybil_joins)} sybil joins "
          f"committed, {len(members)} trainer seats, byzantine {counters(byz.home)}; unfair proposals seen "
          f"{[counters(v.home).get('proposals_unfair', 0) for v in honest]}")
