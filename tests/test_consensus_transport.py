"""ConsensusTransport: direct validator streams over real in-process P2PNodes on 127.0.0.1, plus its sans-I/O parts."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from flnode.node.net import (
    CONSENSUS_PROTOCOL,
    ConsensusTransport,
    P2PNode,
    Stream,
    encode_frames,
    has_quorum,
    peer_id_of,
)
from flnode.node.net.consensus_stream import DirectConfig
from flnode.node.net.flow import FrameDecoder, FrameTooBig, PeerQueue, RateBudget, SeenSet
from flnode.protocol.crypto import NodeKey

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


@dataclass
class Member:
    seed: bytes
    peer_id: str
    node: P2PNode | None = None
    transport: ConsensusTransport | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def t(self) -> ConsensusTransport:
        assert self.transport is not None
        return self.transport


def make_members(n: int) -> list[Member]:
    keys = [NodeKey.generate() for _ in range(n)]
    return [Member(k.seed, peer_id_of(k.public_key)) for k in keys]


class Cluster:
    def __init__(self, nursery: trio.Nursery, members: list[Member], ids: set[str], direct: bool = False,
                 **tkw: Any) -> None:
        self.nursery, self.members, self.ids, self.direct, self.tkw = nursery, members, ids, direct, tkw

    def addrs(self, but: Member) -> list[str]:
        return [m.node.listen_addrs()[0] for m in self.members if m is not but and m.node and m.node.listen_addrs()]

    async def start(self, m: Member) -> None:
        m.node = P2PNode(m.seed, LOCAL, bootstrap=self.addrs(m))
        direct = DirectConfig(NodeKey(m.seed), "test-chain", "127.0.0.1") if self.direct else None
        m.transport = ConsensusTransport(m.node, self.ids, direct=direct, **self.tkw)
        m.scope = trio.CancelScope()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with m.scope:
                async with trio.open_nursery() as n:
                    assert m.node is not None and m.transport is not None
                    await n.start(m.node.run)
                    await n.start(m.transport.run)
                    task_status.started()

        await self.nursery.start(run)

    async def stop(self, m: Member) -> None:
        m.scope.cancel()
        await trio.sleep(0.1)
        m.node = m.transport = None


@asynccontextmanager
async def cluster(members: list[Member], ids: set[str] | None = None, *, start: int | None = None,
                  direct: bool = False, **tkw: Any) -> AsyncIterator[Cluster]:
    """Nodes that bootstrap to every earlier node; the transports know `ids` (default: all members)."""
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, members, ids if ids is not None else {m.peer_id for m in members}, direct, **tkw)
        for m in members[:start]:
            await c.start(m)
        yield c
        nursery.cancel_scope.cancel()


async def full_mesh(c: Cluster, members: list[Member]) -> None:
    with trio.fail_after(10):
        for m in members:
            await m.t.wait_connected(x.peer_id for x in members if x is not m)


async def collect(t: ConsensusTransport, want: int, timeout: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    with trio.move_on_after(timeout):
        while len(got) < want:
            got.append(await t.inbound.receive())
    return got


async def raw_stream(x: P2PNode, target: str) -> Stream:
    """A raw consensus stream between `x` (running, connected to target) and a transport: x dials when its id
    is the lower one, else waits for the transport's dial (x's handler must be set before x runs)."""
    if x.peer_id < target:
        return await x.open_stream(target, CONSENSUS_PROTOCOL, timeout=5)
    raise AssertionError("use accept_raw for a higher id")


def accept_raw(x: P2PNode) -> trio.MemoryReceiveChannel[Stream]:
    send, recv = trio.open_memory_channel[Stream](10)

    async def handler(peer: str, stream: Stream) -> None:
        await send.send(stream)
        await trio.sleep_forever()  # keeps the stream open; host.py resets it when this ends

    x.set_stream_handler(CONSENSUS_PROTOCOL, handler)
    return recv


# ---------------------------------------------------------------- sans-I/O parts


def test_peer_queue_drops_oldest_round_first_and_stays_bounded() -> None:
    q = PeerQueue(max_bytes=300, resend_after=2.0)
    assert q.push(b"a" * 100, b"ha", 5, 1, 0.0).queued
    assert q.push(b"b" * 100, b"hb", 5, 0, 0.0).queued
    assert q.push(b"c" * 100, b"hc", 4, 3, 0.0).queued
    r = q.push(b"d" * 100, b"hd", 5, 2, 0.0)
    assert r.queued and r.dropped == 1 and q.nbytes == 300  # (4, 3) went first
    r = q.push(b"e" * 100, b"he", 3, 0, 0.0)
    assert not r.queued and r.dropped == 1  # the newcomer is the stalest: it is the one dropped
    assert q.push(b"a" * 100, b"ha", 5, 1, 1.0).duplicate
    assert not q.push(b"c" * 100, b"hc", 4, 3, 1.0).duplicate  # dropped earlier, so it may go again
    assert q.take_all()[0] == b"a" * 100 and q.nbytes == 0
    assert q.push(b"a" * 100, b"ha", 5, 1, 2.5).queued  # a rebroadcast after resend_after goes through


def test_seen_set_forgets_by_age_and_count() -> None:
    s = SeenSet(max_entries=2, ttl=1.0)
    s.add(b"1", 0.0)
    s.add(b"2", 0.0)
    s.add(b"3", 0.5)
    assert not s.seen(b"1", 0.6) and s.seen(b"2", 0.6) and not s.seen(b"3", 1.6)


def test_frame_decoder_splits_batches_and_refuses_big_frames() -> None:
    d = FrameDecoder(max_frame=10)
    wire = encode_frames([b"", b"abc", b"0123456789"])
    assert d.feed(wire[:5]) == [b""] and d.feed(wire[5:9]) == [] and d.feed(wire[9:]) == [b"abc", b"0123456789"]
    with pytest.raises(FrameTooBig):
        d.feed((11).to_bytes(4, "big"))


def test_rate_budget() -> None:
    b = RateBudget(msgs_per_s=10, bytes_per_s=1000)
    assert all(b.spend(10, 0.0) for _ in range(10)) and not b.spend(10, 0.0)
    assert b.spend(10, 0.5) and not b.spend(2000, 10.0)


def test_has_quorum_by_power() -> None:
    powers = {"a": 1, "b": 1, "c": 1, "d": 1}
    assert not has_quorum(powers, [], "a", 1)
    assert not has_quorum(powers, ["b", "x"], "a", 1)  # 2 of 4; strangers count nothing
    assert has_quorum(powers, ["b", "c"], "a", 1)
    assert has_quorum({"a": 1, "b": 10, "c": 1}, ["b"], "a", 1) and not has_quorum({"b": 10, "c": 1}, ["c"], "a", 1)


# ---------------------------------------------------------------- real nodes


def check_link_kind(m: Member, direct: bool) -> None:
    kind, other = ("direct_sessions", "libp2p_sessions") if direct else ("libp2p_sessions", "direct_sessions")
    assert m.t.counters[kind] > 0 and m.t.counters[other] == 0, m.t.counters


@pytest.mark.parametrize("direct", [False, True], ids=["libp2p", "direct"])
async def test_four_nodes_full_mesh_deliver_every_broadcast_exactly_once(direct: bool) -> None:
    ms = make_members(4)
    with trio.fail_after(20):
        async with cluster(ms, direct=direct) as c:
            await full_mesh(c, ms)
            for m in ms:  # one stream per pair: the lower id dials, so nobody accepted a duplicate
                assert m.t.connected() == {x.peer_id for x in ms} - {m.peer_id}
                assert m.t.counters["rejected_streams"] == 0
            per = 50
            for k in range(per):
                for i, m in enumerate(ms):
                    m.t.broadcast(b"n%d-m%d" % (i, k) + os.urandom(200), height=1, round=0)
                if k % 10 == 0:
                    await trio.sleep(0)
            results = {}
            async with trio.open_nursery() as n:
                async def recv(m: Member) -> None:
                    results[m.peer_id] = await collect(m.t, 3 * per, 10)

                for m in ms:
                    n.start_soon(recv, m)
            await trio.sleep(0.3)  # nothing extra arrives
            index = {m.peer_id: i for i, m in enumerate(ms)}
            for m in ms:
                got = results[m.peer_id]
                assert len(got) == 3 * per and m.t.inbound.statistics().current_buffer_used == 0
                assert len({d for _, d in got}) == 3 * per
                assert Counter(p for p, _ in got) == {x.peer_id: per for x in ms if x is not m}
                assert all(d.startswith(b"n%d-" % index[p]) for p, d in got)  # the stream's peer is the sender
                assert m.t.counters["sent"] == 3 * per and m.t.counters["received"] == 3 * per
                assert m.t.counters["writes"] < m.t.counters["sent"]  # batched
                check_link_kind(m, direct)


@pytest.mark.parametrize("direct", [False, True], ids=["libp2p", "direct"])
async def test_reconnected_peer_gets_later_messages_and_a_rebroadcast(direct: bool) -> None:
    ms = make_members(3)
    a, b, _ = ms
    with trio.fail_after(20):
        async with cluster(ms, direct=direct) as c:
            await full_mesh(c, ms)
            m1 = b"proposal h1 r0"
            a.t.broadcast(m1, height=1, round=0)
            assert await collect(b.t, 1, 5) == [(a.peer_id, m1)]
            a.t.broadcast(m1, height=1, round=0)  # same bytes on the same connection: suppressed
            assert a.t.counters["duplicates_out"] >= 1

            await c.stop(b)
            with trio.fail_after(5):
                while b.peer_id in a.t.connected():
                    await trio.sleep(0.05)
            a.t.broadcast(b"vote while b is down", height=1, round=0)

            await c.start(b)  # same identity, new port; it bootstraps to a and c
            await full_mesh(c, ms)
            a.t.broadcast(b"vote after", height=1, round=1)
            a.t.broadcast(m1, height=1, round=0)  # the consensus rebroadcast: a new connection, so it goes
            got = await collect(b.t, 2, 5)
            assert [d for _, d in got] == [b"vote after", m1]
            assert await collect(b.t, 1, 0.3) == []
            assert a.t.counters["disconnects"] >= 1 and a.t.counters["connects"] >= 3
            check_link_kind(a, direct)


async def test_slow_peer_does_not_block_others_and_its_queue_stays_bounded() -> None:
    ms = make_members(2)
    a, fast = ms
    bound = 256 << 10
    with trio.fail_after(20):
        slow_key = NodeKey.generate()
        slow_id = peer_id_of(slow_key.public_key)
        async with cluster(ms, {a.peer_id, fast.peer_id, slow_id}, max_queue_bytes=bound, write_timeout=2.0) as c:
            await full_mesh(c, ms)
            async with raw_peer_with_key(slow_key, a) as (_, slow_stream):
                await slow_stream.write(encode_frames([b""]))  # hello, then it never reads
                with trio.fail_after(5):
                    await a.t.wait_connected([slow_id])
                # Yamux lets ~4 MiB go unread before writes block, so push 6.4 MiB; pace by the fast peer only.
                n, size = 400, 16 << 10
                peak = 0
                for k in range(n):
                    a.t.broadcast(b"%05d" % k + os.urandom(size), height=1 + k // 50, round=0)
                    peak = max(peak, a.t.queued_bytes(slow_id))
                    if k % 8 == 7:
                        while a.t.queued_bytes(fast.peer_id):
                            await trio.sleep(0.002)
                got = await collect(fast.t, n, 5)
                assert len(got) == n and [d[:5] for _, d in got] == [b"%05d" % k for k in range(n)]
                assert peak <= bound and a.t.counters["dropped"] > 0
                with trio.fail_after(5):  # the stalled writer times out and the session ends (p9)
                    while slow_id in a.t.connected():
                        await trio.sleep(0.05)
                assert a.t.counters["write_timeouts"] >= 1
                assert fast.peer_id in a.t.connected()


@asynccontextmanager
async def raw_peer_with_key(key: NodeKey, target: Member) -> AsyncIterator[tuple[P2PNode, Stream]]:
    assert target.node is not None
    x = P2PNode(key.seed, LOCAL, bootstrap=[target.node.listen_addrs()[0]])
    recv = accept_raw(x)
    async with trio.open_nursery() as nursery:
        await nursery.start(x.run)
        with trio.fail_after(10):
            while target.peer_id not in x.connected_peers():
                await trio.sleep(0.05)
            stream = await raw_stream(x, target.peer_id) if x.peer_id < target.peer_id else await recv.receive()
        yield x, stream
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("attack", ["oversize", "flood"])
async def test_garbage_or_flooding_peer_is_cut_off_and_counted(attack: str) -> None:
    ms = make_members(2)
    a, honest = ms
    bad_key = NodeKey.generate()
    bad_id = peer_id_of(bad_key.public_key)
    with trio.fail_after(20):
        async with cluster(ms, {a.peer_id, honest.peer_id, bad_id}, max_msgs_per_sec=50, cutoff_backoff=30) as c:
            await full_mesh(c, ms)
            async with raw_peer_with_key(bad_key, a) as (bad, stream):
                await stream.write(encode_frames([b""]))
                with trio.fail_after(5):
                    await a.t.wait_connected([bad_id])
                if attack == "oversize":
                    await stream.write(b"\xff\xff\xff\xff" + os.urandom(100))
                else:
                    await stream.write(encode_frames([b"spam %d" % i for i in range(500)]))
                with trio.fail_after(5):
                    while bad_id in a.t.connected():
                        await trio.sleep(0.05)
                assert a.t.counters["cut_off"] == 1
                assert a.t.counters["received"] <= 50
                if bad_id < a.peer_id:  # it dials again at once: refused during the back-off
                    with pytest.raises(Exception):  # noqa: B017 - reset or EOF, whichever libp2p reports
                        s2 = await bad.open_stream(a.peer_id, CONSENSUS_PROTOCOL, timeout=5)
                        await s2.write(encode_frames([b""]))
                        with trio.fail_after(5):
                            assert await s2.read(100)
                    assert a.t.counters["rejected_streams"] >= 1
                else:  # we dial it: not during the back-off
                    await trio.sleep(1.0)
                    assert bad_id not in a.t.connected() and a.t.counters["connects"] == 2
                a.t.broadcast(b"still fine", height=2, round=0)
                assert await collect(honest.t, 1, 5) == [(a.peer_id, b"still fine")]


async def test_startup_gate_opens_and_closes_as_validators_come_and_go() -> None:
    ms = make_members(4)
    a, b, cc, _ = ms
    powers = {m.peer_id: 1 for m in ms}
    with trio.fail_after(20):
        async with cluster(ms, start=1) as c:
            assert not a.t.quorum_linked(powers, 1)
            await c.start(b)
            await full_mesh(c, [a, b])
            assert not a.t.quorum_linked(powers, 1)  # 2 of 4 is not > 2/3
            opened = trio.Event()

            async def waiter() -> None:
                await a.t.wait_quorum_linked(powers, 1)
                opened.set()

            c.nursery.start_soon(waiter)
            await trio.sleep(0.2)
            assert not opened.is_set()
            await c.start(cc)
            with trio.fail_after(10):
                await opened.wait()
            assert a.t.quorum_linked(powers, 1)
            await c.stop(cc)
            with trio.fail_after(5):
                while a.t.quorum_linked(powers, 1):
                    await trio.sleep(0.05)
            assert a.t.quorum_linked({**powers, b.peer_id: 5}, 1)  # by power, not by count


async def test_outsiders_fill_their_own_listener_slots_and_a_member_still_gets_in() -> None:
    """Five outsider keys dial a validator first: two get outsider slots, the rest are refused; a member (a
    trainer or an admitted node) that dials afterwards still gets its slot."""
    v, member, *outsiders = make_members(7)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            v.node = P2PNode(v.seed, LOCAL)
            v.transport = ConsensusTransport(v.node, {v.peer_id}, max_subscribers=1, max_outsiders=2,
                                             is_member=lambda p: p == member.peer_id)
            await nursery.start(v.node.run)
            await nursery.start(v.transport.run)

            async def listen(m: Member) -> None:
                assert v.node is not None
                m.node = P2PNode(m.seed, LOCAL, bootstrap=v.node.listen_addrs()[:1])
                m.transport = ConsensusTransport(m.node, {v.peer_id}, dial_all=True)
                await nursery.start(m.node.run)
                await nursery.start(m.transport.run)

            for m in outsiders:
                await listen(m)
            while len(v.t.subscribers()) < 2 or v.t.counters["rejected_streams"] < 3:
                await trio.sleep(0.05)
            await listen(member)
            while member.peer_id not in v.t.subscribers():
                await trio.sleep(0.05)
            subs = v.t.subscribers()
            assert len(subs - {member.peer_id}) == 2 and subs <= {member.peer_id, *(m.peer_id for m in outsiders)}
            nursery.cancel_scope.cancel()


async def test_a_listener_sends_nothing_and_stays_linked() -> None:
    """A node that is not a validator (a joiner with its join transaction, a trainer relaying) broadcasts on its
    transport: nothing goes out, so the validator never cuts it off as a listener that speaks, and the validator's
    own messages still reach it."""
    v, joiner = make_members(2)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            v.node = P2PNode(v.seed, LOCAL)
            v.transport = ConsensusTransport(v.node, {v.peer_id}, is_member=lambda p: True)
            await nursery.start(v.node.run)
            await nursery.start(v.transport.run)
            joiner.node = P2PNode(joiner.seed, LOCAL, bootstrap=v.node.listen_addrs()[:1])
            joiner.transport = ConsensusTransport(joiner.node, {v.peer_id}, dial_all=True)
            await nursery.start(joiner.node.run)
            await nursery.start(joiner.transport.run)
            while joiner.peer_id not in v.t.subscribers() or v.peer_id not in joiner.t.connected():
                await trio.sleep(0.05)
            joiner.t.broadcast(b"a join transaction", height=3, round=0)
            v.t.broadcast(b"a vote", height=3, round=0)
            with trio.fail_after(5):
                frame = await joiner.t.inbound.receive()
            assert frame == (v.peer_id, b"a vote")
            await trio.sleep(0.3)
            assert v.t.counters["cut_off"] == 0 and v.t.counters["received"] == 0
            assert joiner.peer_id in v.t.subscribers()
            assert joiner.t.counters["listener_not_sent"] == 1 and joiner.t.counters["sent"] == 0
            nursery.cancel_scope.cancel()
