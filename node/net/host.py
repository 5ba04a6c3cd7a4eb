"""The one place that touches py-libp2p (0.8.1). Everything else sees `P2PNode`.

Workarounds for the py-libp2p pitfalls described in docs/LIBP2P.md are marked `(pN)`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import base58
import multiaddr
import trio
from nacl.signing import SigningKey

from .frames import MAX_REQUEST, Handler, Stream, StreamHandler
from .redial import redial
from .requests import Requests

log = logging.getLogger("flnode.net")

Validator = Callable[[str, bytes, str | None], bool]  # (topic, data, forwarding peer id)


def _import_libp2p() -> None:
    import libp2p  # noqa: F401  # the package imports nearly all of itself (transports, dns, quic, crypto)
    import libp2p.pubsub.gossipsub  # noqa: F401


@dataclass(frozen=True)
class InboundMessage:
    topic: str
    data: bytes
    from_peer: str | None


def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer ID of an Ed25519 public key: a validator's network identity is its signing key.

    Computed here, as libp2p defines it (the identity multihash of the protobuf-encoded key, in base58btc), so a
    node knows every id before it imports libp2p: that import costs 0.8 s of CPU, which 16 or 32 processes
    starting together on 2 cores pay before anyone can commit (tests check it against libp2p's own)."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    encoded = b"\x08\x01\x12\x20" + public_key  # PublicKey{Type: Ed25519, Data: key}
    return base58.b58encode(b"\x00" + bytes([len(encoded)]) + encoded).decode()


def _content_id(msg: Any) -> bytes:
    return hashlib.sha256(bytes(msg.data)).digest()


class P2PNode:
    def __init__(
        self,
        seed: bytes,
        listen: Sequence[str],
        *,
        bootstrap: Sequence[str] = (),
        topics: Sequence[str] = (),
        validator: Validator | None = None,
        max_message_size: int = 1 << 20,
        announce: Sequence[str] | None = None,
        mesh_degree: int = 6,
        max_peers: int = 0,
    ) -> None:
        self._seed = seed
        self._listen = [multiaddr.Multiaddr(a) for a in listen]
        self._bootstrap = list(bootstrap)
        self._topics = list(topics)
        self._validator = validator
        self._max_message_size = max_message_size
        self._announce = [multiaddr.Multiaddr(a) for a in announce] if announce else None
        self._mesh_degree = mesh_degree
        # Dial bootstrap peers only while fewer than this many are connected (0: all). Each node prefers its own
        # subset (ordered by a hash of both ids), so the libp2p graph is a random one of about twice this degree.
        self._max_peers = max_peers
        # libp2p makes its Ed25519 key from this seed in run(): its id is this one (no libp2p import here)
        self.peer_id: str = peer_id_of(bytes(SigningKey(seed).verify_key))
        self._inbound_send, self.inbound = trio.open_memory_channel[InboundMessage](10_000)
        self.counters: dict[str, int] = {}
        self._host: Any = None
        self._pubsub: Any = None
        self._ready = trio.Event()
        self.requests = Requests(lambda: self._host, self.count)

    def count(self, name: str, by: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + by

    # ---------------------------------------------------------------- request/response (node/net/requests.py)

    def set_handler(self, protocol_id: str, handler: Handler, *, max_request: int = MAX_REQUEST) -> None:
        self.requests.set_handler(protocol_id, handler, max_request=max_request)

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        self.requests.set_stream_handler(protocol_id, handler)

    async def serve_direct_request(self, peer: str, stream: Any) -> None:
        await self.requests.serve_direct_request(peer, stream)

    async def open_stream(self, peer: str, protocol_id: str, *, timeout: float) -> Stream:
        return await self.requests.open_stream(peer, protocol_id, timeout=timeout)

    async def request(self, peer: str, protocol_id: str, payload: bytes, *, max_response: int, timeout: float) -> bytes:
        return await self.requests.request(peer, protocol_id, payload, max_response=max_response, timeout=timeout)

    async def request_into(
        self, peer: str, protocol_id: str, payload: bytes, sink: Callable[[bytes], Awaitable[None]], *,
        max_response: int, timeout: float, idle_timeout: float | None = None,
    ) -> int:
        return await self.requests.request_into(peer, protocol_id, payload, sink, max_response=max_response,
                                                timeout=timeout, idle_timeout=idle_timeout)

    # ---------------------------------------------------------------- gossip

    async def publish(self, topic: str, data: bytes) -> None:
        if self._pubsub is None:
            self.count("publish_failed")
            return
        if len(data) > self._max_message_size:
            self.count("publish_oversize")
            log.warning("not publishing an oversize message", extra={"topic": topic, "size": len(data)})
            return
        try:
            await self._pubsub.publish(topic, data)
            self.count("published")
        except Exception as exc:
            self.count("publish_failed")
            log.warning("publish failed", extra={"topic": topic, "error": repr(exc)[:200]})

    def _topic_validator(self, topic: str) -> Callable[[Any, Any], bool]:
        def validate(peer_id: Any, msg: Any) -> bool:
            if self._validator is None:
                return True
            try:
                try:
                    forwarder: str | None = peer_id.to_base58()
                except Exception:
                    forwarder = None
                ok = bool(self._validator(topic, bytes(msg.data), forwarder))
            except Exception as exc:  # a validator bug must not take the host down
                log.warning("gossip validator raised", extra={"error": repr(exc)[:200]})
                ok = False
            if not ok:
                self.count("dropped_invalid")
            return ok

        return validate

    async def _drain(self, topic: str, sub: Any) -> None:
        """(p7) a subscription holds 32 messages: move them into our own queue at once."""
        while True:
            msg = await sub.get()
            try:
                from libp2p.peer.id import ID

                sender = ID(msg.from_id).to_base58()
            except Exception:
                sender = None
            try:
                self._inbound_send.send_nowait(InboundMessage(topic, bytes(msg.data), sender))
            except trio.WouldBlock:
                self.count("inbound_overflow")

    # ---------------------------------------------------------------- peers

    def connected_peers(self) -> list[str]:
        if self._host is None:
            return []
        try:
            return sorted(p.to_base58() for p in self._host.get_connected_peers())
        except Exception:
            return []

    def remote_host(self, peer: str) -> str | None:
        """The IP address our newest connection to `peer` goes to (where its direct link listens too)."""
        if self._host is None:
            return None
        from libp2p.peer.id import ID

        try:
            for conn in reversed(self._host.get_network().get_connections(ID.from_base58(peer))):
                addr = conn.muxed_conn.get_remote_address()
                if addr:
                    return str(addr[0])
        except Exception as exc:
            log.debug("no remote address", extra={"peer": peer[:16], "error": repr(exc)[:200]})
        return None

    def listen_addrs(self) -> list[str]:
        if self._host is None:
            return []
        try:
            return [str(a) for a in self._host.get_addrs()]
        except Exception:
            return []

    async def connect(self, addr: str, timeout: float = 5.0) -> bool:
        from libp2p.peer.peerinfo import info_from_p2p_addr

        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            if info.peer_id.to_base58() == self.peer_id:
                return True
            # (p25) one failed dial puts the peer in libp2p's 60 s negative cache; our loop has its own back-off
            unblock = getattr(self._host.get_network(), "unblock_peer", None)
            if unblock is not None:
                unblock(info.peer_id)
            with trio.fail_after(timeout):
                await self._host.connect(info)
            return True
        except Exception as exc:
            log.debug("dial failed", extra={"addr": addr, "error": repr(exc)[:200]})
            return False

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(_import_libp2p)  # 0.8 s of CPU: the event loop keeps its turns meanwhile
        from libp2p import new_host
        from libp2p.identity_utils import create_identity_from_seed
        from libp2p.network.config import ConnectionConfig
        from libp2p.pubsub import pubsub as pubsub_mod
        from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.pubsub.rpc_queue import RpcQueue
        from libp2p.tools.anyio_service import background_trio_service

        # (p19) credit the Yamux window in batches, not on every partial read; read at call time by libp2p.
        os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
        # (p6) outbound frame cap and queue depth have no public knob.
        pubsub_mod.RpcQueue = functools.partial(  # type: ignore[misc,assignment]
            RpcQueue, max_size=1024, max_message_size=self._max_message_size + 4096)
        key_pair = create_identity_from_seed(self._seed)
        from libp2p.peer.id import ID

        if ID.from_pubkey(key_pair.public_key).to_base58() != self.peer_id:  # peer_id_of and libp2p disagree
            raise RuntimeError("libp2p derives another peer id from this key")
        kwargs: dict[str, Any] = {"key_pair": key_pair}
        kwargs["connection_config"] = ConnectionConfig(max_connections_per_peer=1)  # (p8) fast dials
        if self._announce:
            kwargs["announce_addrs"] = self._announce
        host = new_host(**kwargs)
        d = self._mesh_degree
        router = GossipSub(
            protocols=[PROTOCOL_ID_V11],  # (p16) v1.2+ sends one IDONTWANT RPC per mesh peer per message
            degree=d, degree_low=max(1, d - 2), degree_high=d + 2,  # (p13) all-to-all below d + 2 peers
            heartbeat_interval=1,
            adaptive_gossip_enabled=False,  # (p18) it stretches the heartbeat to 30-60 s
            spam_protection_enabled=False,  # (p5) we rate-limit ourselves
        )
        ps = Pubsub(
            host, router, strict_signing=True, max_inbound_rpc_size=self._max_message_size + 4096,
            msg_id_constructor=_content_id,  # (p21) a re-sent or relayed payload is the same message
        )
        for topic in self._topics:
            ps.set_topic_validator(topic, self._topic_validator(topic), False)
        self._host = host
        self.requests.install_all()
        try:
            # (p2) services before host.run, or an early peer crashes the host.
            async with background_trio_service(ps), background_trio_service(router):
                async with host.run(self._listen):
                    try:
                        subs = [(t, await ps.subscribe(t)) for t in self._topics]
                        self._pubsub = ps
                        async with trio.open_nursery() as nursery:
                            for topic, sub in subs:
                                nursery.start_soon(self._drain, topic, sub)
                            nursery.start_soon(redial, self, self._bootstrap, self._max_peers)
                            self._ready.set()
                            task_status.started()
                            await trio.sleep_forever()
                    finally:
                        self._pubsub = None
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            await host.close()  # (p3) frees the listener
        finally:
            self._host = None
