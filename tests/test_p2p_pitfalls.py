"""Our libp2p adapter against the py-libp2p 0.8.1 pitfalls listed in docs/LIBP2P.md: one test each (pN)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from flnode.node.net import NetError, P2PNode, peer_id_of
from flnode.protocol.crypto import NodeKey

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


@asynccontextmanager
async def network(n: int, *, star: bool = True, topics: tuple[str, ...] = ("t",), **kw: object) -> AsyncIterator[list[P2PNode]]:
    """n in-process nodes; the first is the hub every other one bootstraps from."""
    async with trio.open_nursery() as nursery:
        hub = P2PNode(NodeKey.generate().seed, LOCAL, topics=topics, **kw)  # type: ignore[arg-type]
        await nursery.start(hub.run)
        nodes = [hub]
        for _ in range(n - 1):
            boot = [hub.listen_addrs()[0]] if star else [nodes[-1].listen_addrs()[0]]
            node = P2PNode(NodeKey.generate().seed, LOCAL, bootstrap=boot, topics=topics, **kw)  # type: ignore[arg-type]
            await nursery.start(node.run)
            nodes.append(node)
        with trio.fail_after(15):
            while any(not x.connected_peers() for x in nodes):
                await trio.sleep(0.05)
        await trio.sleep(1.2)  # one gossipsub heartbeat builds the mesh
        yield nodes
        nursery.cancel_scope.cancel()


async def collect(node: P2PNode, want: int, timeout: float) -> list[bytes]:
    got: list[bytes] = []
    with trio.move_on_after(timeout):
        async for m in node.inbound:
            got.append(m.data)
            if len(got) >= want:
                break
    return got


def test_peer_id_is_the_validator_key() -> None:
    key = NodeKey.generate()
    assert P2PNode(key.seed, LOCAL).peer_id == peer_id_of(key.public_key)


async def test_p1_handler_exception_does_not_kill_host() -> None:
    async with network(2) as (a, b):
        async def boom(peer: str, req: bytes) -> bytes:
            raise RuntimeError("handler bug")

        async def echo(peer: str, req: bytes) -> bytes:
            return req

        a.set_handler("/t/boom/1", boom)
        a.set_handler("/t/echo/1", echo)
        for _ in range(3):
            try:
                await b.request(a.peer_id, "/t/boom/1", b"x", max_response=100, timeout=5)
                raise AssertionError("a failing handler must not answer")
            except NetError:
                pass
        assert await b.request(a.peer_id, "/t/echo/1", b"still alive", max_response=100, timeout=5) == b"still alive"
        assert a.counters.get("handler_errors", 0) >= 3


async def test_p2_p12_mutual_bootstrap_and_late_peer_still_connects() -> None:
    """Peers dial before we are up (p2), and a bootstrap peer that appears after libp2p's own give-up (p12)."""
    late_key = NodeKey.generate()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    late_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(late_key.public_key)}"
    async with trio.open_nursery() as nursery:
        early = P2PNode(NodeKey.generate().seed, LOCAL, bootstrap=[late_addr], topics=["t"])
        await nursery.start(early.run)
        await trio.sleep(4)  # several failed dials
        late = P2PNode(late_key.seed, [f"/ip4/127.0.0.1/tcp/{port}"], bootstrap=[early.listen_addrs()[0]], topics=["t"])
        await nursery.start(late.run)
        with trio.fail_after(15):
            while late.peer_id not in early.connected_peers():
                await trio.sleep(0.1)
        assert early.counters.get("dials_failed", 0) >= 2
        nursery.cancel_scope.cancel()


async def test_p3_port_is_free_after_shutdown() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with trio.open_nursery() as nursery:
        node = P2PNode(NodeKey.generate().seed, [f"/ip4/127.0.0.1/tcp/{port}"], topics=["t"])
        await nursery.start(node.run)
        nursery.cancel_scope.cancel()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()  # would fail if the libp2p listener were still open


async def test_p5_p7_p13_burst_reaches_every_leaf_of_a_star() -> None:
    """200 messages in a burst from one leaf reach the hub and every other leaf (spam protection off, our drain,
    mesh degree above the network size)."""
    async with network(6) as nodes:
        sender, receivers = nodes[1], [n for n in nodes if n is not nodes[1]]
        async with trio.open_nursery() as nursery:
            results: dict[int, list[bytes]] = {}

            async def recv(i: int, node: P2PNode) -> None:
                results[i] = await collect(node, 200, 20)

            for i, node in enumerate(receivers):
                nursery.start_soon(recv, i, node)
            for k in range(200):
                await sender.publish("t", b"m%d" % k)
        assert all(len(v) == 200 for v in results.values()), {i: len(v) for i, v in results.items()}


async def test_p6_p11_oversize_gossip_is_refused_and_big_blobs_go_over_streams() -> None:
    async with network(2) as (a, b):
        await a.publish("t", os.urandom((1 << 20) + 10))
        assert a.counters.get("publish_oversize") == 1
        blob = os.urandom(12 << 20)  # p10: above the 6.6 MB where libp2p's read_exactly fails

        async def serve(peer: str, req: bytes) -> bytes:
            return blob

        a.set_handler("/t/blob/1", serve)
        got = await b.request(a.peer_id, "/t/blob/1", b"give", max_response=16 << 20, timeout=30)
        assert got == blob
        try:
            await b.request(a.peer_id, "/t/blob/1", b"give", max_response=1 << 20, timeout=30)
            raise AssertionError("an oversize response must be refused")
        except NetError as exc:
            assert "exceeds" in str(exc)


async def test_p9_slow_consumer_loses_nothing() -> None:
    """We stop reading for 6 s (longer than Yamux's 5 s window timeout): our drain keeps the streams flowing."""
    async with network(2) as (a, b):
        for k in range(150):
            await a.publish("t", b"x%d" % k)
        await trio.sleep(6)
        got = await collect(b, 150, 10)
        assert len(got) == 150
        for k in range(10):
            await a.publish("t", b"after%d" % k)
        assert len(await collect(b, 10, 10)) == 10


async def test_p14_validator_false_or_raising_drops_the_message() -> None:
    def validator(topic: str, data: bytes, peer: str | None) -> bool:
        if data.startswith(b"raise"):
            raise ValueError("validator bug")
        return not data.startswith(b"bad")

    async with network(3, validator=validator) as nodes:
        for payload in (b"bad one", b"raise one", b"good one"):
            await nodes[1].publish("t", payload)
        got = await collect(nodes[2], 3, 3)
        assert got == [b"good one"]
        assert nodes[1].counters.get("dropped_invalid", 0) >= 2


async def test_request_timeout_is_bounded() -> None:
    async with network(2) as (a, b):
        async def slow(peer: str, req: bytes) -> bytes:
            await trio.sleep(30)
            return b""

        a.set_handler("/t/slow/1", slow)
        t0 = trio.current_time()
        try:
            await b.request(a.peer_id, "/t/slow/1", b"x", max_response=10, timeout=1.0)
            raise AssertionError("must time out")
        except NetError as exc:
            assert "timed out" in str(exc)
        assert trio.current_time() - t0 < 3


def test_peer_ids_are_libp2p_s_without_importing_libp2p() -> None:
    """peer_id_of computes libp2p's peer id itself, so the daemon starts without the 0.8 s libp2p import."""
    import subprocess
    import sys

    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.identity_utils import create_identity_from_seed
    from libp2p.peer.id import ID

    for _ in range(64):
        key = NodeKey.generate()
        want = ID.from_pubkey(Ed25519PublicKey.from_bytes(key.public_key)).to_base58()
        assert peer_id_of(key.public_key) == want
        assert P2PNode(key.seed, LOCAL).peer_id == ID.from_pubkey(create_identity_from_seed(key.seed).public_key).to_base58()
    code = "import sys, flnode.node.daemon, flnode.cli.node_cmd; print(any(m.split('.')[0] == 'libp2p' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
