"""The daemon's small services, each driven through its own surface: head, timers, mempool, peers, seat, outbox,
start-up."""

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


def test_head_lets_go_of_a_state_once_it_advanced(chain: Any) -> None:
    """The per-state cache of validator sets must not keep old states (each with a whole model) alive: with a
    10M-parameter model that cache held up to eight models, 150 MB per node."""
    import gc
    import weakref

    g, blocks, _ = chain
    state = genesis_state(g)
    head = Head(g, state, genesis_block_hash(g), None)
    for h in range(1, 3):
        assert head.validator_set(h) is not None
    old = weakref.ref(state)
    del state
    head.advance(blocks[0][2], blocks[0][0].hash(), blocks[0][1])
    assert head.validator_set(2) is not None
    gc.collect()
    assert old() is None


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


def _seat(g: Any, voting: bool = True) -> tuple[Any, Any, Any]:
    from flnode.consensus import ValidatorSet
    from flnode.node.seat import Seat

    head = Head(g, genesis_state(g), genesis_block_hash(g), None)
    calls: list[Any] = []
    machine = SimpleNamespace(validators=ValidatorSet(g.powers), set_validators=lambda vs: (calls.append(("set", vs)),
                                                                          setattr(machine, "validators", vs)))
    transport = SimpleNamespace(set_validators=lambda peers, dial_all: calls.append(("links", dial_all)))
    seat = Seat(KEYS[0].public_key, head, machine, Peers(g, head), transport, voting)  # type: ignore[arg-type]
    return seat, head, calls


def test_seat_gives_the_machine_the_next_heights_set_once_and_votes_by_power(chain: Any) -> None:
    from flnode.consensus import ValidatorSet

    g, _, _ = chain
    seat, head, calls = _seat(g)
    seat.before_height()
    assert calls == [("set", head.validator_set(1))]
    seat.before_height()  # the same set object: nothing to do
    assert len(calls) == 1
    seat.follow(ValidatorSet({k.public_key: 1 for k in KEYS[1:]}))  # a set without us: listen, dial every one
    assert seat.voting is False and calls[-1] == ("links", True)
    seat.follow(ValidatorSet({k.public_key: 1 for k in KEYS}))
    assert seat.voting is True and calls[-1] == ("links", False)


def _outbox(g: Any, voting: bool, subscribers: set[str], connected: list[str]) -> tuple[Any, list[Any], Any]:
    from flnode.node.metrics import Metrics
    from flnode.node.outbox import Outbox
    from flnode.node.supervise import Tasks
    from flnode.protocol.topics import Topics

    head = Head(g, genesis_state(g), genesis_block_hash(g), None)
    sent: list[Any] = []

    async def publish(topic: str, data: bytes) -> None:
        sent.append(("gossip", topic, data))

    net = SimpleNamespace(publish=publish, connected_peers=lambda: connected)
    transport = SimpleNamespace(broadcast=lambda data, height, round: sent.append(("direct", height, data)),
                                subscribers=lambda: subscribers)
    machine = SimpleNamespace(height=1, round=0)
    seat = SimpleNamespace(voting=voting)
    box = Outbox(Topics.for_chain(g.chain_id), head, net, transport, Peers(g, head), seat, None,  # type: ignore[arg-type]
                 machine, Tasks(Metrics()))  # type: ignore[arg-type]
    return box, sent, machine


def test_outbox_sends_our_update_directly_and_on_gossip_only_when_someone_beyond_the_validators_listens(
    chain: Any
) -> None:
    g, _, _ = chain
    validator_peer = peer_id_of(KEYS[1].public_key)
    box, sent, _ = _outbox(g, True, set(), [validator_peer])
    trio.run(box.send_update, b"u", 1)
    assert sent == [("direct", 1, b"u")]
    box, sent, _ = _outbox(g, True, set(), [validator_peer, "12D3KooWtrainer"])
    trio.run(box.send_update, b"u", 1)
    assert [s[0] for s in sent] == ["direct", "gossip"]
    box, sent, _ = _outbox(g, False, set(), [validator_peer])  # a trainer: gossip only
    trio.run(box.send_update, b"u", 1)
    assert [s[0] for s in sent] == ["gossip"]


def test_outbox_brings_a_validator_that_connects_up_to_date(chain: Any) -> None:
    g, _, _ = chain
    box, sent, machine = _outbox(g, True, set(), [])
    send, receive = trio.open_memory_channel[Any](1)
    box.rebroadcast = send
    box.own_update = lambda: (1, b"mine")
    box.validator_connected("peer")
    assert sent == [("direct", 1, b"mine")]
    assert receive.receive_nowait() == TimeoutFired(TimeoutKind.REBROADCAST, 1, 0)
    box.own_update = lambda: (0, b"old")  # an update of a settled height is not re-sent
    machine.height = 5  # nor is a round of a height the node is not at
    box.validator_connected("peer")
    assert sent == [("direct", 1, b"mine")]
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()


def test_startup_defers_libp2p_only_for_a_validator_at_genesis_with_direct_links(chain: Any) -> None:
    from flnode.node.startup import Startup

    g, blocks, _ = chain
    head = Head(g, genesis_state(g), genesis_block_hash(g), None)
    transport = SimpleNamespace(direct=object())
    seat = SimpleNamespace(voting=True)

    def startup(direct_peers: bool = True) -> Startup:
        return Startup(head, None, transport, seat, None, None, direct_peers=direct_peers)  # type: ignore[arg-type]

    assert startup().defer_p2p()
    assert not startup(direct_peers=False).defer_p2p()
    seat.voting = False
    assert not startup().defer_p2p()  # a trainer or observer reaches the network only through libp2p
    seat.voting = True
    head.advance(blocks[0][2], blocks[0][0].hash(), blocks[0][1])
    assert not startup().defer_p2p()  # a restart on an existing chain may need blocks from peers


def test_startup_opens_the_links_up_gate_once_peers_hold_two_thirds(chain: Any) -> None:
    from flnode.node.startup import Startup

    g, _, _ = chain
    head = Head(g, genesis_state(g), genesis_block_hash(g), None)
    gate = trio.Event()

    async def wait_quorum_linked(powers: Any, own: int) -> None:
        assert own == 1 and len(powers) == len(KEYS)
        await gate.wait()

    transport = SimpleNamespace(quorum_linked=lambda powers, own: gate.is_set(), wait_quorum_linked=wait_quorum_linked,
                                connected=lambda: [])
    net = SimpleNamespace(peer_id=peer_id_of(KEYS[0].public_key))
    s = Startup(head, net, transport, SimpleNamespace(voting=True), None, None,  # type: ignore[arg-type]
                direct_peers=True)

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(s.wait_for_quorum)
            await trio.testing.wait_all_tasks_blocked()
            assert not s.links_up.is_set()
            gate.set()
        assert s.links_up.is_set()

    trio.run(main)
