"""The one place that touches py-libp2p (0.8.1). Everything else sees `P2PNode`.

Workarounds for the py-libp2p pitfalls described in docs/LIBP2P.md are marked `(pN)`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import base58
import multiaddr
import trio
from nacl.signing import SigningKey

log = logging.getLogger("flnode.net")

FRAME_HEADER = 4
CHUNK = 1 << 20
MAX_REQUEST = 64 << 10
MAX_PROTOCOL_ID = 128

class StreamedResponse:
    """A response too large to hold: `size` bytes produced by `chunks()` (written as one frame, piece by piece).
    `timeout`: how long writing it may take (the handler's usual 30 s does not fit a 400 MB blob)."""

    def __init__(self, size: int, chunks: Callable[[], AsyncIterator[bytes]], timeout: float) -> None:
        self.size = size
        self.chunks = chunks
        self.timeout = timeout


Handler = Callable[[str, bytes], Awaitable["bytes | StreamedResponse"]]
Validator = Callable[[str, bytes, str | None], bool]  # (topic, data, forwarding peer id)
StreamHandler = Callable[[str, "Stream"], Awaitable[None]]


def _import_libp2p() -> None:
    import libp2p  # noqa: F401  # the package imports nearly all of itself (transports, dns, quic, crypto)
    import libp2p.pubsub.gossipsub  # noqa: F401


class NetError(Exception):
    """A request failed: timeout, reset, refused, oversize, or the peer is unknown."""


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


async def _read_exactly(stream: Any, n: int) -> bytes:
    """Our own read loop (p10: libp2p's read_exactly fails above ~6.6 MB)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(min(n - len(buf), CHUNK))
        if not chunk:
            raise NetError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame(stream: Any, max_size: int) -> bytes:
    header = await _read_exactly(stream, FRAME_HEADER)
    size = int.from_bytes(header, "big")
    if size > max_size:
        raise NetError(f"frame of {size} bytes exceeds the cap of {max_size}")
    return await _read_exactly(stream, size) if size else b""


async def write_frame(stream: Any, data: bytes) -> None:
    await stream.write(len(data).to_bytes(FRAME_HEADER, "big"))
    view = memoryview(data)
    for start in range(0, len(data), CHUNK):
        await stream.write(bytes(view[start : start + CHUNK]))


async def _write_streamed(stream: Any, response: StreamedResponse) -> None:
    """One frame whose body comes from response.chunks(); a body of the wrong length is an error (reset)."""
    await stream.write(response.size.to_bytes(FRAME_HEADER, "big"))
    sent = 0
    async for piece in response.chunks():
        sent += len(piece)
        if sent > response.size:
            break
        view = memoryview(piece)
        for start in range(0, len(piece), CHUNK):
            await stream.write(bytes(view[start : start + CHUNK]))
    if sent != response.size:
        raise NetError(f"streamed response of {sent} bytes, announced {response.size}")


def encode_frames(items: Sequence[bytes]) -> bytes:
    """Several frames in one buffer (same wire format as write_frame), so a batch is one write."""
    return b"".join(len(d).to_bytes(FRAME_HEADER, "big") + d for d in items)


class Stream:
    """A long-lived libp2p stream behind a small interface: every libp2p error becomes NetError."""

    def __init__(self, raw: Any, peer: str) -> None:
        self._raw = raw
        self.peer = peer

    async def read(self, n: int) -> bytes:
        try:
            return bytes(await self._raw.read(n))
        except Exception as exc:
            raise NetError(f"read failed: {exc!r}"[:200]) from None

    async def write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            for start in range(0, len(data), CHUNK):
                await self._raw.write(bytes(view[start : start + CHUNK]))
        except Exception as exc:
            raise NetError(f"write failed: {exc!r}"[:200]) from None

    async def reset(self) -> None:
        """Best effort and bounded: a reset must never hang or raise."""
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self._raw.reset()
            except Exception:
                pass


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
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        # libp2p makes its Ed25519 key from this seed in run(): its id is this one (no libp2p import here)
        self.peer_id: str = peer_id_of(bytes(SigningKey(seed).verify_key))
        self._inbound_send, self.inbound = trio.open_memory_channel[InboundMessage](10_000)
        self.counters: dict[str, int] = {}
        self._host: Any = None
        self._pubsub: Any = None
        self._ready = trio.Event()
        # A stream for one request to a validator over a direct link, or None (then libp2p carries it): set by
        # the consensus transport, which knows the direct addresses.
        self.open_direct: Callable[[str], Awaitable[Any]] | None = None

    def _count(self, name: str, by: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + by

    # ---------------------------------------------------------------- request/response

    def set_handler(self, protocol_id: str, handler: Handler, *, max_request: int = MAX_REQUEST) -> None:
        self._handlers[protocol_id] = (handler, max_request)
        if self._host is not None:
            self._install_handler(protocol_id)

    def _install_handler(self, protocol_id: str) -> None:
        from libp2p.custom_types import TProtocol

        handler, max_request = self._handlers[protocol_id]

        async def on_stream(stream: Any) -> None:
            # (p1) an exception escaping a stream handler kills the host: serve_request catches everything
            await self._serve(stream, stream.muxed_conn.peer_id.to_base58(), protocol_id, handler, max_request)

        self._host.set_stream_handler(TProtocol(protocol_id), on_stream)

    async def _serve(self, stream: Any, peer: str, protocol_id: str, handler: Handler, max_request: int) -> None:
        """One framed request and its response; any failure resets the stream and is counted."""
        try:
            with trio.fail_after(30):
                request = await read_frame(stream, max_request)
                response = await handler(peer, request)
                if not isinstance(response, StreamedResponse):
                    await write_frame(stream, response)
            if isinstance(response, StreamedResponse):
                with trio.fail_after(response.timeout):
                    await _write_streamed(stream, response)
            await stream.close()
            self._count("requests_served")
        except Exception as exc:
            self._count("handler_errors")
            log.debug("stream handler failed", extra={"protocol": protocol_id, "error": repr(exc)[:200]})
            try:
                await stream.reset()
            except Exception:
                pass

    async def serve_direct_request(self, peer: str, stream: Any) -> None:
        """A request that came over a direct link: its first frame names the protocol, then as over libp2p."""
        try:
            with trio.fail_after(10):
                protocol_id = (await read_frame(stream, MAX_PROTOCOL_ID)).decode()
        except (NetError, trio.TooSlowError, UnicodeDecodeError):
            self._count("handler_errors")
            return
        entry = self._handlers.get(protocol_id)
        if entry is None:
            self._count("direct_unknown_protocol")
            return
        self._count("direct_requests_served")
        await self._serve(stream, peer, protocol_id, *entry)

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """A long-lived stream protocol: `handler(peer, stream)` owns the stream until it returns."""
        self._stream_handlers[protocol_id] = handler
        if self._host is not None:
            self._install_stream_handler(protocol_id)

    def _install_stream_handler(self, protocol_id: str) -> None:
        from libp2p.custom_types import TProtocol

        handler = self._stream_handlers[protocol_id]

        async def on_stream(raw: Any) -> None:
            stream = None
            try:  # (p1) nothing may escape into libp2p
                stream = Stream(raw, raw.muxed_conn.peer_id.to_base58())
                await handler(stream.peer, stream)
            except Exception as exc:
                self._count("handler_errors")
                log.debug("stream handler failed", extra={"protocol": protocol_id, "error": repr(exc)[:200]})
            finally:
                await (stream or Stream(raw, "")).reset()

        self._host.set_stream_handler(TProtocol(protocol_id), on_stream)

    async def open_stream(self, peer: str, protocol_id: str, *, timeout: float) -> Stream:
        """A new long-lived stream to a peer; the caller resets it when done."""
        if self._host is None:  # checked first: these imports would load all of libp2p on the event loop
            raise NetError("not running")
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        pid = ID.from_base58(peer)
        try:
            with trio.fail_after(timeout):
                raw = await self._host.new_stream(pid, [TProtocol(protocol_id)])
        except trio.TooSlowError:
            await self._close_stale_connections(pid)
            raise NetError(f"opening a stream to {peer[:16]} timed out after {timeout}s") from None
        except Exception as exc:
            await self._close_stale_connections(pid)
            raise NetError(f"opening a stream to {peer[:16]} failed: {exc!r}"[:300]) from None
        return Stream(raw, peer)

    async def _close_stale_connections(self, pid: Any) -> None:
        """(p24) after a peer restarts, its dead connection can stay listed next to the new one and
        new_stream may pick it and hang: keep only the newest connection."""
        try:
            conns = self._host.get_network().get_connections(pid)
            for conn in conns[:-1]:
                with trio.move_on_after(1):
                    await conn.close()
                self._count("stale_connections_closed")
        except Exception as exc:
            log.debug("closing stale connections failed", extra={"error": repr(exc)[:200]})

    async def request(self, peer: str, protocol_id: str, payload: bytes, *, max_response: int, timeout: float) -> bytes:
        """One framed request and its whole response (small ones: directory, status, blocks); errors as NetError."""
        buf = bytearray()

        async def collect(chunk: bytes) -> None:
            buf.extend(chunk)

        await self.request_into(peer, protocol_id, payload, collect, max_response=max_response, timeout=timeout)
        return bytes(buf)

    async def request_into(
        self, peer: str, protocol_id: str, payload: bytes, sink: Callable[[bytes], Awaitable[None]], *,
        max_response: int, timeout: float, idle_timeout: float | None = None,
    ) -> int:
        """A request whose response is passed to `sink` piece by piece as it arrives (never held whole); returns
        its size (0: the peer has nothing). Same framing as request(); errors as NetError. `idle_timeout`: the
        longest wait for the next bytes, so a slow but moving transfer is not cut off by a tight total timeout
        (on a busy machine a retry from scratch only adds load). To a validator with a direct link the request
        takes a direct connection of its own, else a libp2p stream."""
        stream = None
        try:
            with trio.fail_after(timeout):
                if self.open_direct is not None:
                    stream = await self.open_direct(peer)  # None: no direct link to it
                if stream is not None:
                    await write_frame(stream, protocol_id.encode())
                    self._count("direct_requests")
                else:
                    if self._host is None:  # checked first: these imports would load all of libp2p on the loop
                        raise NetError("not running")
                    from libp2p.custom_types import TProtocol
                    from libp2p.peer.id import ID

                    stream = await self._host.new_stream(ID.from_base58(peer), [TProtocol(protocol_id)])
                await write_frame(stream, payload)
                size = int.from_bytes(await _read_exactly(stream, FRAME_HEADER), "big")
                if size > max_response:
                    raise NetError(f"frame of {size} bytes exceeds the cap of {max_response}")
                got = 0
                while got < size:
                    with trio.fail_after(idle_timeout if idle_timeout is not None else timeout):
                        chunk = await stream.read(min(size - got, CHUNK))
                    if not chunk:
                        raise NetError(f"stream ended after {got} of {size} bytes")
                    got += len(chunk)
                    await sink(bytes(chunk))
                await stream.close()
                return size
        except NetError:
            raise
        except trio.TooSlowError:
            raise NetError(f"request to {peer[:16]} timed out after {timeout}s") from None
        except Exception as exc:
            raise NetError(f"request to {peer[:16]} failed: {exc!r}"[:300]) from None
        finally:
            if stream is not None:
                try:
                    with trio.move_on_after(1):
                        await stream.reset()
                except Exception:
                    pass

    # ---------------------------------------------------------------- gossip

    async def publish(self, topic: str, data: bytes) -> None:
        if self._pubsub is None:
            self._count("publish_failed")
            return
        if len(data) > self._max_message_size:
            self._count("publish_oversize")
            log.warning("not publishing an oversize message", extra={"topic": topic, "size": len(data)})
            return
        try:
            await self._pubsub.publish(topic, data)
            self._count("published")
        except Exception as exc:
            self._count("publish_failed")
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
                self._count("dropped_invalid")
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
                self._count("inbound_overflow")

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

    async def _reconnect_loop(self) -> None:
        """(p12) libp2p's bootstrap gives up after 3 failures; we keep dialling known peers, with back-off."""
        backoff: dict[str, float] = {}
        next_try: dict[str, float] = {}
        mine = self.peer_id.encode()
        order = sorted(self._bootstrap, key=lambda a: hashlib.blake2b(mine + a.encode(), digest_size=8).digest())
        while True:
            connected = set(self.connected_peers())
            now = trio.current_time()
            for addr in order:
                pid = addr.rsplit("/p2p/", 1)[-1]
                if pid in connected or next_try.get(addr, 0) > now:
                    continue
                if self._max_peers and len(connected) >= self._max_peers:
                    break
                connected.add(pid)  # counted as soon as tried: one pass dials at most up to the limit
                if await self.connect(addr):
                    backoff.pop(addr, None)
                    log.info("connected", extra={"peer": pid[:16]})
                    self._count("dials_ok")
                else:
                    if addr not in backoff:
                        log.warning("cannot reach bootstrap peer; retrying with back-off", extra={"addr": addr})
                    b = min(10.0, backoff.get(addr, 0.25) * 2)
                    backoff[addr] = b
                    next_try[addr] = trio.current_time() + b
                    self._count("dials_failed")
            await trio.sleep(0.5)

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
        for protocol_id in self._handlers:
            self._install_handler(protocol_id)
        for protocol_id in self._stream_handlers:
            self._install_stream_handler(protocol_id)
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
                            nursery.start_soon(self._reconnect_loop)
                            self._ready.set()
                            task_status.started()
                            await trio.sleep_forever()
                    finally:
                        self._pubsub = None
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            await host.close()  # (p3) frees the listener
        finally:
            self._host = None
