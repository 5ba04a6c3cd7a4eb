"""The daemon's small services, each driven through its own surface: the head, the timers, the mempool, peers."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from flnode.consensus import ScheduleTimeout, TimeoutFired, TimeoutKind
from flnode.node.app import genesis_state
from flnode.node.chain.verify import genesis_block_hash
from flnode.node.head import Head, Signal
from flnode.node.mempool import Mempool
from flnode.node.net import peer_id_of
from flnode.node.peers import Peers
from flnode.node.timers import Timers
from flnode.protocol.messages import UpdateAnnouncement, Vote, VoteType
from test_chain import KEYS, make_chain


@pytest.fixture(scope="module")
def chain() -> Any:
    return make_chain(2)


def test_head_advances_one_height_at_a_time_and_wakes_waiters(chain: Any) -> None:
    g, blocks, _ = chain
    head = Head(g, genesis_state(g), genesis_block_hash(g), None)
    woke: list[int] = []

    async def main() -> None:
        async def waiter(h: int) -> None:
            await head.wait_for(h)
            woke.append(h)

        async with trio.open_nursery() as n:
            n.start_soon(waiter, 1)
            n.start_soon(waiter, 2)
            await trio.testing.wait_all_tasks_blocked()
            assert woke == []
            with pytest.raises(ValueError):  # the committer never skips a height
                head.advance(blocks[1][2], blocks[1][0].hash(), blocks[1][1])
            head.advance(blocks[0][2], blocks[0][0].hash(), blocks[0][1])
            await trio.testing.wait_all_tasks_blocked()
            assert woke == [1] and head.next_height == 2 and head.last_cert == blocks[0][1]
            head.advance(blocks[1][2], blocks[1][0].hash(), blocks[1][1])
        assert woke == [1, 2]
        with trio.fail_after(1):
            await head.wait_for(1)  # already there: returns at once

    trio.run(main)


def test_head_knows_the_set_up_to_the_slashing_delay_and_computes_it_once(chain: Any) -> None:
    g, _, _ = chain
    head = Head(g, genesis_state(g), genesis_block_hash(g), None)
    vs = head.validator_set(1)
    assert vs is not None and set(vs.powers) == {k.public_key for k in KEYS}
    assert head.validator_set(1) is vs  # cached for this state
    assert head.validator_set(0) is None and head.validator_set(10_000) is None


def test_signal_wakes_those_waiting_then_and_not_later_ones() -> None:
    sig = Signal()
    woke: list[str] = []

    async def main() -> None:
        async def wait(name: str) -> None:
            await sig.wait()
            woke.append(name)

        async with trio.open_nursery() as n:
            n.start_soon(wait, "a")
            await trio.testing.wait_all_tasks_blocked()
            sig.set()
            n.start_soon(wait, "b")
            await trio.testing.wait_all_tasks_blocked()
            assert woke == ["a"]
            sig.set()
        assert woke == ["a", "b"]

    trio.run(main)


def test_timers_keep_one_per_kind_and_only_live_ones_fire() -> None:
    fired: list[TimeoutFired] = []

    async def main() -> None:
        async def send(ev: TimeoutFired) -> None:
            fired.append(ev)

        timers = Timers(send)
        async with trio.open_nursery() as n:
            await n.start(timers.run)
            timers.schedule(ScheduleTimeout(TimeoutKind.PROPOSE, 1, 0, 100))
            timers.schedule(ScheduleTimeout(TimeoutKind.PROPOSE, 1, 1, 200))  # replaces round 0's
            timers.schedule(ScheduleTimeout(TimeoutKind.PREVOTE, 1, 0, 50))
            assert timers.pending() == {TimeoutKind.PROPOSE: (1, 1), TimeoutKind.PREVOTE: (1, 0)}
            timers.retain(1, 1)  # the machine is in round 1: round 0's prevote timeout is dead
            assert timers.pending() == {TimeoutKind.PROPOSE: (1, 1)}
            await trio.sleep(0.3)
            assert fired == [TimeoutFired(TimeoutKind.PROPOSE, 1, 1)] and timers.pending() == {}
            n.cancel_scope.cancel()
        assert timers.cancelled == 2 and timers.fired == 1

    trio.run(main)


def _mempool(g: Any, held: set[bytes]) -> tuple[Mempool, Head, list[float]]:
    head = Head(g, genesis_state(g), genesis_block_hash(g), None)
    now = [10.0]
    blobs = SimpleNamespace(holds=lambda h: h in held)
    members = SimpleNamespace(committed=lambda: None)
    return Mempool(g, head, blobs, members, lambda: now[0]), head, now  # type: ignore[arg-type]


def test_mempool_reports_ready_updates_with_the_time_both_parts_arrived(chain: Any) -> None:
    g, blocks, _ = chain
    anns: list[UpdateAnnouncement] = list(blocks[0][0].updates)
    assert len(anns) >= 2
    held: set[bytes] = set()
    pool, _, now = _mempool(g, held)
    arrivals: list[int] = []
    pool.on_arrival = lambda: arrivals.append(1)
    assert pool.add_update(anns[0]) and not pool.add_update(anns[0])  # new once
    assert pool.ready_authors(1) == set()  # its blob is not here yet
    now[0] = 12.0
    held.add(anns[0].blob_hash)
    pool.blob_stored(anns[0].blob_hash)
    assert pool.ready_authors(1) == {anns[0].author} and len(arrivals) == 2
    assert pool.held(1, floor=0.0, default=99.0) == [(anns[0], 12.0)]  # since the later of the two
    other = anns[1]
    assert not pool.add_update(replace(other, height=5))  # outside the pool's window of heights


def test_mempool_commit_prunes_the_settled_height(chain: Any) -> None:
    g, blocks, _ = chain
    anns = list(blocks[0][0].updates)
    pool, head, _ = _mempool(g, {a.blob_hash for a in anns})
    for a in anns:
        pool.add_update(a)
    head.advance(blocks[0][2], blocks[0][0].hash(), blocks[0][1])
    pool.committed()
    assert pool.ready_announcements(1) == [] and pool.held(1, 0.0, 0.0) == []


def test_peers_skip_a_relay_to_those_whose_votes_show_they_have_it(chain: Any) -> None:
    g, _, _ = chain
    peers = Peers(g, Head(g, genesis_state(g), genesis_block_hash(g), None))
    a, b, c = (peer_id_of(k.public_key) for k in KEYS[:3])
    prevote = Vote(VoteType.PREVOTE, 3, 0, b"\x07" * 32, KEYS[0].public_key)
    peers.note(Vote(VoteType.PRECOMMIT, 3, 0, b"\x07" * 32, KEYS[1].public_key))  # b saw that polka
    peers.note(Vote(VoteType.PREVOTE, 2, 0, None, KEYS[2].public_key))  # c is behind
    has_it = peers.already_has(prevote)
    assert has_it(a) and has_it(b) and not has_it(c)  # the signer, the one that precommitted; not the late one
    peers.note(Vote(VoteType.PREVOTE, 4, 0, None, KEYS[2].public_key))  # c decided height 3
    assert peers.already_has(prevote)(c)
    assert peers.is_member_peer(a) and not peers.is_member_peer("12D3KooWoutsider")
