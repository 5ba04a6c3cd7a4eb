"""The direct consensus link (node/net/direct.py): its handshake as a pure state machine, and real sockets."""

from __future__ import annotations

import pytest
import trio
from flnode.node.net import NetError, peer_id_of
from flnode.node.net.direct import (
    Cipher,
    DirectListener,
    DirectStream,
    Handshake,
    HandshakeError,
    dial,
)
from flnode.protocol.crypto import NodeKey

CHAIN = "direct-test"


def pair(chain_b: str = CHAIN) -> tuple[Handshake, Handshake, NodeKey, NodeKey]:
    ka, kb = NodeKey.generate(), NodeKey.generate()
    return Handshake(ka, CHAIN), Handshake(kb, chain_b), ka, kb


def test_handshake_authenticates_both_sides_and_keys_match() -> None:
    a, b, ka, kb = pair()
    a.on_hello(b.hello())
    b.on_hello(a.hello())
    assert a.transcript == b.transcript
    assert b.on_auth(a.auth()) == ka.public_key and a.on_auth(b.auth()) == kb.public_key
    assert a.send is not None and b.recv is not None and b.send is not None and a.recv is not None
    for k in range(3):  # per-direction counters stay in step
        assert b.recv.open(a.send.seal(b"a->b %d" % k)) == b"a->b %d" % k
        assert a.recv.open(b.send.seal(b"b->a %d" % k)) == b"b->a %d" % k


def test_handshake_refuses_another_chain_garbage_and_reflection() -> None:
    a, b, _, _ = pair("other-chain")
    with pytest.raises(HandshakeError, match="another chain"):
        a.on_hello(b.hello())
    with pytest.raises(HandshakeError, match="not a flnode"):
        a.on_hello(b"GET / HTTP/1.1\r\n" + bytes(36))
    with pytest.raises(HandshakeError, match="reflected"):
        a.on_hello(a.hello())
    low_order = b"FLD1" + a.tag + bytes(32)  # the all-zero point gives an all-zero secret
    with pytest.raises(HandshakeError, match="low-order"):
        a.on_hello(low_order)


def test_handshake_refuses_a_forged_or_replayed_identity() -> None:
    a, b, _, _ = pair()
    a.on_hello(b.hello())
    b.on_hello(a.hello())
    sealed = bytearray(a.auth())
    sealed[5] ^= 1
    with pytest.raises(NetError, match="authentication"):
        b.on_auth(bytes(sealed))
    # an identity signed for another session's transcript does not verify in this one
    c, d, _, _ = pair()
    c.on_hello(d.hello())
    d.on_hello(c.hello())
    assert b.recv is not None and a.send is not None and c.transcript != a.transcript
    forged = a.send.seal(c.key.public_key + c.key.sign(CHAIN, "direct-link-auth", c.transcript))
    with pytest.raises(HandshakeError, match="bad identity signature"):
        b.on_auth(forged)


def test_a_frame_replayed_or_reordered_fails() -> None:
    send, recv = Cipher(bytes(range(32))), Cipher(bytes(range(32)))
    first, second = send.seal(b"one"), send.seal(b"two")
    with pytest.raises(NetError):
        recv.open(second)  # out of order: the nonce is the counter
    recv2 = Cipher(bytes(range(32)))
    assert recv2.open(first) == b"one"
    with pytest.raises(NetError):
        recv2.open(first)  # replayed


async def test_real_sockets_round_trip_wrong_peer_and_garbage() -> None:
    server_key, client_key = NodeKey.generate(), NodeKey.generate()
    got: list[tuple[str, bytes]] = []

    async def handler(peer: str, stream: DirectStream) -> None:  # an echo server
        while data := await stream.read(1 << 16):
            got.append((peer, data))
            await stream.write(data)

    listener = DirectListener(server_key, CHAIN, handler, "127.0.0.1")
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            port = await n.start(listener.run)
            server_id = peer_id_of(server_key.public_key)
            big = bytes(range(256)) * 1024  # 256 KiB: several wire frames
            s = await dial("127.0.0.1", port, client_key, CHAIN, server_id, timeout=3)
            await s.write(big)
            reply = b""
            while len(reply) < len(big):
                reply += await s.read(1 << 16)
            assert reply == big
            await s.reset()
            # a dialler that expected another peer refuses the link
            with pytest.raises(HandshakeError, match="not"):
                await dial("127.0.0.1", port, client_key, CHAIN, peer_id_of(NodeKey.generate().public_key), timeout=3)
            # garbage, and a wrong chain, cost the listener one failed handshake each, nothing more
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            await sock.send_all(b"\x00" * 100)
            assert await sock.receive_some(100) != b"x"  # our hello, then the listener closes
            await sock.aclose()
            with pytest.raises(HandshakeError):
                await dial("127.0.0.1", port, client_key, "another-chain", server_id, timeout=3)
            with trio.fail_after(3):
                while listener.counters.get("direct_handshake_failed", 0) < 2:
                    await trio.sleep(0.02)
            s2 = await dial("127.0.0.1", port, client_key, CHAIN, server_id, timeout=3)
            await s2.write(b"again")
            assert await s2.read(100) == b"again"
            await s2.reset()
            n.cancel_scope.cancel()
    assert {p for p, _ in got} == {peer_id_of(client_key.public_key)}
    assert b"".join(d for _, d in got) == big + b"again"


def test_directory_prefers_first_hand_and_refuses_malformed_answers() -> None:
    from flnode.node.net.directory import Directory
    from flnode.protocol.encoding import pack

    d = Directory()
    d.learn_firsthand("A", "10.0.0.1", 1000)
    assert d.learn_relayed([("A", "6.6.6.6", 1), ("B", "10.0.0.2", 2000), ("ME", "x", 1)], me="ME") == 1
    assert d.get("A") == ("10.0.0.1", 1000) and d.get("B") == ("10.0.0.2", 2000) and d.get("ME") is None
    d.learn_firsthand("B", "10.0.0.3", 2001)  # its own answer replaces what others said
    assert d.get("B") == ("10.0.0.3", 2001)
    port, entries = Directory.parse(d.answer(4242))
    assert port == 4242 and sorted(entries) == [("A", "10.0.0.1", 1000), ("B", "10.0.0.3", 2001)]
    d.forget("A")
    assert d.get("A") is None
    for bad in (b"\xc1", pack([1]), pack(["x", []]), pack([70000, []])):
        with pytest.raises(NetError):
            Directory.parse(bad)
    port, entries = Directory.parse(pack([1, [["p", "h", 0], ["p", "h", 5], "junk", ["q" * 65, "h", 5]]]))
    assert entries == [("p", "h", 5)]  # malformed entries are skipped


async def test_validators_not_connected_by_libp2p_still_get_direct_links() -> None:
    """A line of libp2p connections (a-b-c-d); direct links between every pair come from relayed directories."""
    from flnode.node.net import ConsensusTransport, P2PNode
    from flnode.node.net.consensus_stream import DirectConfig

    keys = [NodeKey.generate() for _ in range(4)]
    ids = {peer_id_of(k.public_key) for k in keys}
    nodes: list[P2PNode] = []
    ts: list[ConsensusTransport] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            for k in keys:
                node = P2PNode(k.seed, ["/ip4/127.0.0.1/tcp/0"], bootstrap=[nodes[-1].listen_addrs()[0]] if nodes else [],
                               max_peers=1)
                t = ConsensusTransport(node, ids, direct=DirectConfig(k, CHAIN, "127.0.0.1"))
                await n.start(node.run)
                await n.start(t.run)
                nodes.append(node)
                ts.append(t)
            for i, t in enumerate(ts):
                await t.wait_connected(peer_id_of(k.public_key) for j, k in enumerate(keys) if j != i)
            assert peer_id_of(keys[3].public_key) not in nodes[0].connected_peers()  # no libp2p a-d connection
            ts[0].broadcast(b"from a", height=1, round=0)
            assert await ts[3].inbound.receive() == (peer_id_of(keys[0].public_key), b"from a")
            assert all(t.counters["libp2p_sessions"] == 0 and t.counters["direct_sessions"] >= 1 for t in ts)
            n.cancel_scope.cancel()


async def test_requests_between_validators_take_a_direct_connection_without_libp2p() -> None:
    """Blobs, blocks and status requests to a validator with a direct address go over a direct connection of
    their own (REQUEST_MAGIC), framed as over libp2p, even while libp2p is not running; large responses stream."""
    from flnode.node.net import ConsensusTransport, P2PNode, StreamedResponse
    from flnode.node.net.consensus_stream import DirectConfig

    keys = [NodeKey.generate() for _ in range(2)]
    ids = [peer_id_of(k.public_key) for k in keys]
    big = bytes(range(256)) * (12 << 10)  # 3 MiB: many 64 KiB wire frames

    async def reverse(peer: str, request: bytes) -> bytes:
        assert peer == ids[0]  # the authenticated identity of the requester
        return request[::-1]

    async def stream_big(peer: str, request: bytes) -> StreamedResponse:
        async def chunks():  # type: ignore[no-untyped-def]
            for i in range(0, len(big), 1 << 20):
                yield big[i:i + (1 << 20)]

        return StreamedResponse(len(big), chunks, timeout=10)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            nodes = [P2PNode(k.seed, ["/ip4/127.0.0.1/tcp/0"]) for k in keys]  # never run: no libp2p
            ts = [ConsensusTransport(node, ids, direct=DirectConfig(k, CHAIN, "127.0.0.1"))
                  for node, k in zip(nodes, keys, strict=True)]
            nodes[1].set_handler("/test/reverse/1", reverse)
            nodes[1].set_handler("/test/big/1", stream_big)
            for t in ts:
                await n.start(t.run)
            links = ts[1].links
            assert links is not None and links.listener is not None
            ts[0].directory.configure([(ids[1], "127.0.0.1", links.listener.port)], ids[0])
            assert await nodes[0].request(ids[1], "/test/reverse/1", b"abc", max_response=16, timeout=5) == b"cba"
            got = bytearray()

            async def sink(chunk: bytes) -> None:
                got.extend(chunk)

            size = await nodes[0].request_into(ids[1], "/test/big/1", b"", sink, max_response=len(big), timeout=10)
            assert size == len(big) and bytes(got) == big
            with pytest.raises(NetError):  # a protocol the peer does not serve
                await nodes[0].request(ids[1], "/test/none/1", b"", max_response=16, timeout=5)
            with pytest.raises(NetError):  # the cap holds over a direct connection too
                await nodes[0].request(ids[1], "/test/big/1", b"", max_response=1000, timeout=5)
            with pytest.raises(NetError, match="not running"):  # no direct address, no libp2p: nothing to use
                await nodes[1].request(ids[0], "/test/reverse/1", b"abc", max_response=16, timeout=5)
            assert nodes[0].counters["direct_requests"] == 4
            assert nodes[1].counters["direct_requests_served"] == 3 and nodes[1].counters["requests_served"] == 2
            assert nodes[1].counters["direct_unknown_protocol"] == 1
            assert ts[1].counters["direct_requests_accepted"] == 4 and ts[1].counters["direct_accepted"] == 0
            n.cancel_scope.cancel()


def test_a_request_handshake_cannot_pass_for_a_consensus_link() -> None:
    """The purpose is bound into the transcript: a request dialler and a consensus listener agree on it; a
    consensus-only peer that ignored the request magic would derive other keys."""
    from flnode.node.net.direct import REQUEST_MAGIC

    ka, kb = NodeKey.generate(), NodeKey.generate()
    a, b = Handshake(ka, CHAIN, magic=REQUEST_MAGIC), Handshake(kb, CHAIN)
    a.on_hello(b.hello())
    b.on_hello(a.hello())
    assert a.purpose == b.purpose == "request" and a.transcript == b.transcript
    plain_a, plain_b = Handshake(ka, CHAIN), Handshake(kb, CHAIN)
    plain_a.on_hello(plain_b.hello())
    assert plain_a.purpose == "consensus" and plain_a.transcript != a.transcript
