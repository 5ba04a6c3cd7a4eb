"""A direct, encrypted TCP link between two validators for consensus frames, outside py-libp2p's stack.

Why: a consensus frame through py-libp2p's yamux + noise costs ~0.3 ms of CPU on each side (docs/LIBP2P.md,
"Direct links"); here a batch costs one `send_all`, one `receive_some` and one AEAD call. libp2p still finds
peers, carries gossip to and from non-validators, and tells each side the other's direct port
(`/flnode/direct/1.0.0`). A request between validators (a blob, blocks, a status) takes a direct connection of its
own (`REQUEST_MAGIC`), so a 40 MB blob never queues behind, or in front of, consensus frames.

Handshake, in the station-to-station pattern of CometBFT's SecretConnection, with pynacl's primitives:
1. each side sends `MAGIC | chain tag | ephemeral X25519 public key`;
2. both derive two ChaCha20-Poly1305 keys (one per direction) from the X25519 shared secret and the transcript
   (both ephemeral keys, in byte order);
3. each side sends, encrypted, its Ed25519 identity key and its signature of the transcript; the other side
   verifies it and so learns the peer id (the libp2p id of that key). A dialler refuses any id but the one it
   wanted to reach.
After that every wire frame is `4-byte length | AEAD(plaintext)`, nonces are per-direction counters, and the
plaintext is the consensus transport's own length-framed batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from flnode.protocol.crypto import NodeKey, verify
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from nacl.exceptions import RuntimeError as NaclRuntimeError

from .frames import FRAME_HEADER, NetError, close_quietly
from .host import peer_id_of

log = logging.getLogger("flnode.net.direct")

MAGIC = b"FLD1"  # a consensus link
REQUEST_MAGIC = b"FLQ1"  # one request and its response (blobs, blocks, status), on a connection of its own
AUTH_KIND = "direct-link-auth"
MAX_WIRE_FRAME = (64 << 10) + 16  # plaintext is cut into 64 KiB pieces
PIECE = 64 << 10
HANDSHAKE_TIMEOUT = 3.0
MAX_HANDSHAKES = 32  # concurrent inbound handshakes; more wait (a slow-loris costs a slot for 3 s at most)


class HandshakeError(NetError):
    pass


def chain_tag(chain_id: str) -> bytes:
    return hashlib.blake2b(chain_id.encode(), digest_size=16, person=b"flnode-direct").digest()


def _kdf(shared: bytes, transcript: bytes, label: bytes) -> bytes:
    return hashlib.blake2b(shared + transcript, digest_size=32, person=label.ljust(16, b"\0")[:16]).digest()


class Cipher:
    """One direction of a link: ChaCha20-Poly1305 with a counter nonce (never reused: one key per direction)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._n = 0

    def _nonce(self) -> bytes:
        nonce = self._n.to_bytes(12, "little")
        self._n += 1
        return nonce

    def seal(self, plain: bytes) -> bytes:
        return crypto_aead_chacha20poly1305_ietf_encrypt(plain, None, self._nonce(), self._key)

    def open(self, sealed: bytes) -> bytes:
        try:
            return crypto_aead_chacha20poly1305_ietf_decrypt(sealed, None, self._nonce(), self._key)
        except CryptoError:
            raise NetError("a direct frame failed authentication") from None


class Handshake:
    """The handshake's state, sans-I/O: `hello()` out, `on_hello(peer_hello)`, `auth()` out, `on_auth(sealed)`."""

    HELLO_SIZE = len(MAGIC) + 16 + 32

    def __init__(self, key: NodeKey, chain_id: str, eph_secret: bytes | None = None, magic: bytes = MAGIC) -> None:
        self.key = key
        self.chain_id = chain_id
        self.magic = magic
        self.purpose = "request" if magic == REQUEST_MAGIC else "consensus"  # the listener learns it from the hello
        self.tag = chain_tag(chain_id)
        self._eph = eph_secret or os.urandom(32)
        self.eph_public = crypto_scalarmult_base(self._eph)
        self.transcript = b""
        self.send: Cipher | None = None
        self.recv: Cipher | None = None

    def hello(self) -> bytes:
        return self.magic + self.tag + self.eph_public

    def on_hello(self, data: bytes) -> None:
        if len(data) != self.HELLO_SIZE or data[:4] not in (MAGIC, REQUEST_MAGIC):
            raise HandshakeError("not a flnode direct link")
        if data[:4] == REQUEST_MAGIC:
            self.purpose = "request"
        if data[4:20] != self.tag:
            raise HandshakeError("the peer is on another chain")
        theirs = data[20:]
        if theirs == self.eph_public:
            raise HandshakeError("the peer reflected our own key")
        try:
            shared = crypto_scalarmult(self._eph, theirs)
        except NaclRuntimeError:  # libsodium refuses low-order points
            shared = bytes(32)
        if shared == bytes(32):
            raise HandshakeError("a low-order ephemeral key")
        lo, hi = sorted((self.eph_public, theirs))
        purpose = b"request" if self.purpose == "request" else b""  # bound into the keys and the signatures
        self.transcript = hashlib.blake2b(purpose + self.tag + lo + hi, digest_size=32).digest()
        k_up, k_down = _kdf(shared, self.transcript, b"lo->hi"), _kdf(shared, self.transcript, b"hi->lo")
        mine_lo = self.eph_public == lo
        self.send, self.recv = Cipher(k_up if mine_lo else k_down), Cipher(k_down if mine_lo else k_up)

    def auth(self) -> bytes:
        assert self.send is not None
        return self.send.seal(self.key.public_key + self.key.sign(self.chain_id, AUTH_KIND, self.transcript))

    def on_auth(self, sealed: bytes) -> bytes:
        """The peer's verified identity key."""
        assert self.recv is not None
        plain = self.recv.open(sealed)
        if len(plain) != 96:
            raise HandshakeError("a malformed identity")
        pub, sig = plain[:32], plain[32:]
        if pub == self.key.public_key:
            raise HandshakeError("the peer claims our own identity")
        if not verify(pub, self.chain_id, AUTH_KIND, self.transcript, sig):
            raise HandshakeError("a bad identity signature")
        return pub


class DirectStream:
    """An authenticated link with the read/write/reset surface of host.Stream; `read` returns plaintext."""

    def __init__(self, sock: trio.SocketStream, peer: str, send: Cipher, recv: Cipher,
                 purpose: str = "consensus") -> None:
        self._sock = sock
        self.peer = peer
        self.purpose = purpose
        self._send = send
        self._recv = recv
        self._wire = bytearray()
        self._send_lock = trio.Lock()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        parts: list[bytes] = []  # joined once: each byte is copied for the cipher and for the join, no more
        for start in range(0, max(1, len(data)), PIECE):
            sealed = self._send.seal(bytes(view[start : start + PIECE]))
            parts += (len(sealed).to_bytes(FRAME_HEADER, "big"), sealed)
        try:
            async with self._send_lock:
                await self._sock.send_all(b"".join(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise NetError(f"direct write failed: {exc!r}"[:200]) from None

    async def read(self, n: int) -> bytes:
        """The plaintext of the next wire frames available (at least one); b"" once the peer closed."""
        out: list[bytes] = []
        while not out:
            wire, at = self._wire, 0
            with memoryview(wire) as view:  # released before the bytearray is resized
                while len(wire) - at >= FRAME_HEADER:
                    size = int.from_bytes(view[at : at + FRAME_HEADER], "big")
                    if size > MAX_WIRE_FRAME:
                        raise NetError(f"a direct frame of {size} bytes exceeds {MAX_WIRE_FRAME}")
                    if len(wire) - at < FRAME_HEADER + size:
                        break
                    out.append(self._recv.open(bytes(view[at + FRAME_HEADER : at + FRAME_HEADER + size])))
                    at += FRAME_HEADER + size
            del wire[:at]
            if out:
                break
            try:
                chunk = await self._sock.receive_some(max(n, 1 << 16))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise NetError(f"direct read failed: {exc!r}"[:200]) from None
            if not chunk:
                return b""
            self._wire += chunk
        return out[0] if len(out) == 1 else b"".join(out)

    async def reset(self) -> None:
        await close_quietly(self._sock.aclose)


async def _read_exact(sock: trio.SocketStream, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        chunk = await sock.receive_some(1 << 16)
        if not chunk:
            raise HandshakeError("the peer closed during the handshake")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


class ExactReader:
    """A direct stream whose `read(n)` returns at most n bytes (the rest is kept for the next read), as the
    request framing of requests.py expects; a DirectStream returns whole wire frames."""

    def __init__(self, stream: DirectStream) -> None:
        self.stream = stream
        self.peer = stream.peer
        self._left = b""

    async def read(self, n: int) -> bytes:
        if not self._left:
            self._left = await self.stream.read(n)
        if len(self._left) <= n:  # the usual case: handed on without a copy
            out, self._left = self._left, b""
        else:
            out, self._left = self._left[:n], self._left[n:]
        return out

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    async def close(self) -> None:
        await self.stream.reset()

    async def reset(self) -> None:
        await self.stream.reset()


async def handshake(sock: trio.SocketStream, key: NodeKey, chain_id: str, magic: bytes = MAGIC) -> DirectStream:
    """Run both halves of the handshake on a connected socket; any failure raises NetError."""
    hs = Handshake(key, chain_id, magic=magic)
    buf = bytearray()
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await sock.send_all(hs.hello())
            hs.on_hello(await _read_exact(sock, Handshake.HELLO_SIZE, buf))
            sealed = hs.auth()
            await sock.send_all(len(sealed).to_bytes(FRAME_HEADER, "big") + sealed)
            size = int.from_bytes(await _read_exact(sock, FRAME_HEADER, buf), "big")
            if size > 256:
                raise HandshakeError("an oversize identity frame")
            pub = hs.on_auth(await _read_exact(sock, size, buf))
    except trio.TooSlowError:
        raise HandshakeError("handshake timed out") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise HandshakeError(f"handshake failed: {exc!r}"[:200]) from None
    assert hs.send is not None and hs.recv is not None
    stream = DirectStream(sock, peer_id_of(pub), hs.send, hs.recv, hs.purpose)
    stream._wire = buf  # bytes the peer sent right after its identity
    return stream


async def dial(host: str, port: int, key: NodeKey, chain_id: str, expect_peer: str, *, timeout: float,
               magic: bytes = MAGIC) -> DirectStream:
    try:
        with trio.fail_after(timeout):
            sock = await trio.open_tcp_stream(host, port)
    except (trio.TooSlowError, OSError) as exc:
        raise NetError(f"direct dial to {host}:{port} failed: {exc!r}"[:200]) from None
    try:
        stream = await handshake(sock, key, chain_id, magic)
    except BaseException:
        with trio.CancelScope(shield=True):
            await sock.aclose()
        raise
    if stream.peer != expect_peer:
        await stream.reset()
        raise HandshakeError(f"{host}:{port} is {stream.peer[:16]}, not {expect_peer[:16]}")
    return stream


class DirectListener:
    """Accepts direct links and hands each authenticated one to `handler(peer, stream)`, which owns it; a
    request connection goes to `request_handler(peer, reader)` instead."""

    def __init__(self, key: NodeKey, chain_id: str, handler: Callable[[str, DirectStream], Awaitable[None]],
                 host: str, port: int = 0, counters: dict[str, int] | None = None,
                 request_handler: Callable[[str, ExactReader], Awaitable[None]] | None = None) -> None:
        self.key = key
        self.chain_id = chain_id
        self.handler = handler
        self.request_handler = request_handler
        self.host = host
        self.port = port
        self.counters = counters if counters is not None else {}
        self._slots = trio.CapacityLimiter(MAX_HANDSHAKES)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._on_conn, listeners, handler_nursery=nursery)

    async def _on_conn(self, sock: trio.SocketStream) -> None:
        try:
            async with self._slots:
                stream = await handshake(sock, self.key, self.chain_id)
        except NetError as exc:
            self.counters["direct_handshake_failed"] = self.counters.get("direct_handshake_failed", 0) + 1
            log.debug("direct handshake failed", extra={"error": str(exc)[:200]})
            with trio.CancelScope(shield=True):
                await sock.aclose()
            return
        try:
            if stream.purpose == "request":
                self.counters["direct_requests_accepted"] = self.counters.get("direct_requests_accepted", 0) + 1
                if self.request_handler is not None:
                    await self.request_handler(stream.peer, ExactReader(stream))
            else:
                self.counters["direct_accepted"] = self.counters.get("direct_accepted", 0) + 1
                await self.handler(stream.peer, stream)
        finally:
            await stream.reset()
