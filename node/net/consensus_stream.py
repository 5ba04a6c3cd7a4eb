"""Consensus messages over one direct, long-lived libp2p stream per validator pair (not gossipsub).

Why (docs/LIBP2P.md, "Scaling"): gossipsub in py-libp2p 0.8.1 costs ~0.5 ms CPU per RPC, sends IDONTWANT
storms and relays every vote to every mesh peer; at 16 validators it livelocks. Here every message is one
length-framed write to each validator, batched per peer, with bounded per-peer queues (the CometBFT
consensus-reactor pattern). Loss recovery is the consensus machine's own rebroadcast, so the transport
only has to be bounded and fair, never reliable.

The bookkeeping (`SeenSet`, `PeerQueue`, `RateBudget`, `FrameDecoder`, in flow.py) is sans-I/O and takes
`now`; `ConsensusTransport` is the trio part.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from flnode.protocol.crypto import NodeKey

from .direct import (
    DIRECT_PROTOCOL,
    MAX_DIRECTORY_ANSWER,
    REQUEST_MAGIC,
    DirectListener,
    Directory,
    ExactReader,
    dial,
)
from .flow import FrameDecoder, FrameTooBig, PeerQueue, RateBudget, SeenSet, digest
from .frames import NetError, Stream, encode_frames
from .gate import has_quorum
from .host import P2PNode

log = logging.getLogger("flnode.net.consensus")

CONSENSUS_PROTOCOL = "/flnode/consensus/1.0.0"
READ_CHUNK = 256 << 10
HELLO = b""  # the first frame each side sends; a session counts as connected once the peer's hello arrived

COUNTERS = (
    "sent", "received", "bytes_in", "bytes_out", "writes", "dropped", "cut_off", "duplicates_in",
    "duplicates_out", "inbound_overflow", "oversize", "connects", "disconnects", "dial_failed",
    "write_timeouts", "rejected_streams", "skipped_peer_has_it", "direct_sessions", "libp2p_sessions",
    "direct_dial_failed", "direct_accepted", "direct_handshake_failed", "direct_no_port", "direct_no_host",
    "direct_requests_accepted", "direct_request_dial_failed", "listener_not_sent",
)


class LinkStream(Protocol):
    """A libp2p stream (host.Stream) or a direct link (direct.DirectStream)."""

    async def read(self, n: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def reset(self) -> None: ...


@dataclass(frozen=True)
class DirectConfig:
    """Consensus frames over our own encrypted TCP link (node/net/direct.py) when both sides have one."""

    key: NodeKey
    chain_id: str
    host: str  # listen address of the direct link
    port: int = 0  # 0: any free port (peers learn it over libp2p)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _CutOff(Exception):
    pass


@dataclass(eq=False)
class _Session:
    peer: str
    stream: LinkStream
    queue: PeerQueue
    budget: RateBudget
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    wakeup: trio.Event = field(default_factory=trio.Event)
    subscriber: bool = False  # a non-validator that only listens (an observer, a trainer)


class ConsensusTransport:
    """Direct streams to validators: `broadcast` enqueues, `inbound` yields `(peer_id, bytes)` once per message.

    The lower peer id of a pair dials and the higher one accepts, so a pair has one stream; a newer stream
    from the same peer replaces the old one. `run` must be started in the node's nursery after (or while)
    `P2PNode.run` runs; libp2p connections themselves stay the P2PNode's job (bootstrap, reconnect loop).
    """

    def __init__(
        self,
        p2p: P2PNode,
        validator_peer_ids: Iterable[str],
        *,
        max_queue_bytes: int = 4 << 20,
        max_frame: int = (1 << 20) + 4096,
        inbound_buffer: int = 4096,
        max_msgs_per_sec: float = 2000,
        max_bytes_per_sec: float = 32 << 20,
        resend_after: float = 2.0,
        redeliver_after: float = 2.0,
        write_timeout: float = 5.0,
        open_timeout: float = 2.0,
        cutoff_backoff: float = 10.0,
        tick: float = 0.0,
        protocol_id: str = CONSENSUS_PROTOCOL,
        max_subscribers: int = 8,
        max_outsiders: int = 2,
        is_member: Callable[[str], bool] | None = None,
        dial_all: bool = False,
        direct: DirectConfig | None = None,
    ) -> None:
        self.p2p = p2p
        self.peers = set(validator_peer_ids) - {p2p.peer_id}
        self.max_queue_bytes = max_queue_bytes
        self.max_frame = max_frame
        self.max_msgs_per_sec = max_msgs_per_sec
        self.max_bytes_per_sec = max_bytes_per_sec
        self.resend_after = resend_after
        self.write_timeout = write_timeout
        self.open_timeout = open_timeout
        self.cutoff_backoff = cutoff_backoff
        self.tick = tick
        self.protocol_id = protocol_id
        self.max_subscribers = max_subscribers  # listener slots for members (trainers, admitted nodes)
        self.max_outsiders = max_outsiders  # and a separate few for anyone else, so outsiders cannot take them all
        self.is_member = is_member or (lambda peer: False)
        self.dial_all = dial_all  # a listener (not a validator) dials every validator, whatever the id order
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._inbound_send, self.inbound = trio.open_memory_channel[tuple[str, bytes]](inbound_buffer)
        self._delivered = SeenSet(65536, redeliver_after)
        self._sessions: dict[str, _Session] = {}
        self._banned_until: dict[str, float] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._dialing: set[str] = set()  # peers a dial loop runs for
        self._listening: set[str] = set()  # non-validators whose accepted stream holds a listener slot
        # called when a validator's stream is up: what was sent before it connected never reached it
        self.on_connect: Callable[[str], None] | None = None
        p2p.set_stream_handler(protocol_id, self._accept)
        self.direct = direct
        self._listener: DirectListener | None = None
        self.directory = Directory()
        self._asked: dict[str, float] = {}  # libp2p peer -> when we last asked it for its directory
        if direct is not None:
            self._listener = DirectListener(direct.key, direct.chain_id, self._accept, direct.host, direct.port,
                                            self.counters, request_handler=p2p.serve_direct_request)
            p2p.set_handler(DIRECT_PROTOCOL, self._serve_directory, max_request=16)
            p2p.requests.open_direct = self.open_request

    # ---------------------------------------------------------------- API

    def connected(self) -> set[str]:
        return {p for p, s in self._sessions.items() if not s.subscriber}

    def reachable(self) -> list[str]:
        """Peers a request can go to: libp2p connections, and validators linked to us (over a direct link a
        request needs no libp2p connection)."""
        return list(dict.fromkeys([*self.p2p.connected_peers(), *sorted(self.connected())]))

    async def open_request(self, peer: str) -> ExactReader | None:
        """A direct connection for one request to `peer`, or None (no direct address known, or the dial failed:
        libp2p carries it)."""
        addr = self.directory.get(peer) if self.direct is not None else None
        if addr is None or self.direct is None:
            return None
        try:
            stream = await dial(addr[0], addr[1], self.direct.key, self.direct.chain_id, peer,
                                timeout=self.open_timeout, magic=REQUEST_MAGIC)
        except NetError as exc:
            self.counters["direct_request_dial_failed"] += 1
            log.debug("direct request dial failed", extra={"peer": peer[:16], "error": str(exc)[:200]})
            return None
        return ExactReader(stream)

    def subscribers(self) -> set[str]:
        return {p for p, s in self._sessions.items() if s.subscriber}

    def queued_bytes(self, peer: str) -> int:
        s = self._sessions.get(peer)
        return s.queue.nbytes if s else 0

    def broadcast(self, data: bytes, *, height: int, round: int, skip: Callable[[str], bool] | None = None) -> None:
        """Never blocks: queue `data` for every connected validator (not for those offline: rebroadcast), except
        the peers `skip` says already have it. A node that is not a validator only listens: a validator cuts off
        (and refuses for a while) a listener that sends, so nothing is queued."""
        if self.dial_all:
            self.counters["listener_not_sent"] += 1
            return
        if len(data) > self.max_frame:
            self.counters["oversize"] += 1
            log.warning("not sending an oversize consensus message", extra={"size": len(data)})
            return
        h, now = digest(data), trio.current_time()
        for s in self._sessions.values():
            if skip is not None and skip(s.peer):
                self.counters["skipped_peer_has_it"] += 1
                continue
            r = s.queue.push(data, h, height, round, now)
            self.counters["dropped"] += r.dropped
            self.counters["duplicates_out"] += r.duplicate
            if r.queued:
                s.wakeup.set()

    def quorum_linked(self, powers: Mapping[str, int], self_power: int) -> bool:
        return has_quorum(powers, self._sessions, self.p2p.peer_id, self_power)

    async def wait_quorum_linked(self, powers: Mapping[str, int], self_power: int) -> None:
        while True:
            changed = self._changed
            if self.quorum_linked(powers, self_power):
                return
            await changed.wait()

    async def wait_connected(self, peers: Iterable[str]) -> None:
        want = set(peers)
        while True:
            changed = self._changed
            if want <= self._sessions.keys():
                return
            await changed.wait()

    def set_validators(self, validator_peer_ids: Iterable[str], *, dial_all: bool) -> None:
        """The validator set changed (open membership): dial the new validators, and let a stream whose
        role changed (a listener that became a validator, a validator that left) reconnect in its new role."""
        new = set(validator_peer_ids) - {self.p2p.peer_id}
        changed = (new ^ self.peers) | (self.peers if dial_all != self.dial_all else set())
        self.peers, self.dial_all = new, dial_all
        for peer in changed:
            s = self._sessions.get(peer)
            if s is not None:
                s.scope.cancel()
        if self._nursery is not None:
            for peer in sorted(new - self._dialing):
                self._nursery.start_soon(self._dial_loop, peer)

    def cut_off(self, peer: str, reason: str) -> None:
        """Drop a peer's stream and refuse it for `cutoff_backoff` seconds (also for the consensus layer)."""
        self.counters["cut_off"] += 1
        self._banned_until[peer] = trio.current_time() + self.cutoff_backoff
        log.warning("consensus peer cut off", extra={"peer": peer[:16], "reason": reason[:200]})
        s = self._sessions.get(peer)
        if s is not None:
            s.scope.cancel()

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._listener is not None:
                    try:
                        await nursery.start(self._listener.run)
                    except OSError as exc:  # consensus still runs over libp2p streams
                        log.warning("no direct link listener", extra={"error": str(exc)[:200]})
                        self._listener = None
                if self._listener is not None:
                    nursery.start_soon(self._directory_loop)
                for peer in sorted(self.peers):
                    if self.dial_all or self.p2p.peer_id < peer:  # the lower id dials
                        nursery.start_soon(self._dial_loop, peer)
                task_status.started()
                await trio.sleep_forever()  # accepted sessions run in this nursery too
        finally:
            self._nursery = None

    def _banned(self, peer: str) -> bool:
        return self._banned_until.get(peer, 0.0) > trio.current_time()

    async def _dial_loop(self, peer: str) -> None:
        self._dialing.add(peer)
        try:
            await self._dial_while_needed(peer)
        finally:
            self._dialing.discard(peer)

    async def _dial_while_needed(self, peer: str) -> None:
        backoff = 0.1
        while peer in self.peers:  # set_validators may take it out (and start a new loop if it comes back)
            if not (self.dial_all or self.p2p.peer_id < peer):  # the other side dials (our role changed)
                await trio.sleep(0.5)
                continue
            # a direct link needs only its address (from any peer's directory); a libp2p stream, a connection
            while self._banned(peer) or not (self.directory.get(peer) or peer in self.p2p.connected_peers()):
                await trio.sleep(0.1)
            try:
                stream: LinkStream | None = await self._dial_direct(peer)
                if stream is None:
                    stream = await self.p2p.open_stream(peer, self.protocol_id, timeout=self.open_timeout)
            except NetError as exc:
                self.counters["dial_failed"] += 1
                log.debug("consensus stream dial failed", extra={"peer": peer[:16], "error": str(exc)[:200]})
            else:
                started = trio.current_time()
                await self._session(peer, stream)
                if trio.current_time() - started > 10:
                    backoff = 0.1  # it was a working session, not a flapping one
            await trio.sleep(backoff)
            backoff = min(5.0, backoff * 2)

    async def _serve_directory(self, peer: str, request: bytes) -> bytes:
        return self.directory.answer(self._listener.port if self._listener is not None else 0)

    async def _ask_directory(self, peer: str) -> None:
        """Ask a libp2p-connected peer for its direct port and what it knows of others'."""
        self._asked[peer] = trio.current_time()
        try:
            raw = await self.p2p.request(peer, DIRECT_PROTOCOL, b"", max_response=MAX_DIRECTORY_ANSWER,
                                         timeout=self.open_timeout)
            port, relayed = Directory.parse(raw)
        except NetError as exc:  # not up yet, or a peer without the protocol: ask again later
            self.counters["direct_no_port"] += 1
            log.debug("no directory answer", extra={"peer": peer[:16], "error": str(exc)[:200]})
            return
        host = self.p2p.remote_host(peer)
        if port and host is not None:
            self.directory.learn_firsthand(peer, host, port)
        if host is not None and not _loopback(host):  # its loopback entries mean its own machine, not ours
            relayed = [e for e in relayed if not _loopback(e[1])]
        self.directory.learn_relayed(relayed, self.p2p.peer_id)

    async def _directory_loop(self) -> None:
        """Learn direct addresses from libp2p neighbours, so validators need not all be libp2p-connected: each
        neighbour is asked at once, then again while some validator's address is still unknown (after 1 s, 2 s,
        4 s, ... up to 30 s between asks)."""
        interval: dict[str, float] = {}
        while True:
            now = trio.current_time()
            missing = any(self.directory.get(p) is None for p in self.peers)
            for peer in self.p2p.connected_peers():
                last = self._asked.get(peer)
                if last is None or (missing and now - last >= interval.get(peer, 1.0)):
                    if last is not None:
                        interval[peer] = min(30.0, interval.get(peer, 1.0) * 2)
                    await self._ask_directory(peer)
            await trio.sleep(0.5)

    async def _dial_direct(self, peer: str) -> LinkStream | None:
        """A direct link to `peer` if both sides have one; None means: use a libp2p stream."""
        if self.direct is None or self._listener is None:
            return None
        if self.directory.get(peer) is None and peer in self.p2p.connected_peers():
            await self._ask_directory(peer)
        addr = self.directory.get(peer)
        if addr is None:
            self.counters["direct_no_host"] += 1
            return None
        try:
            return await dial(addr[0], addr[1], self.direct.key, self.direct.chain_id, peer, timeout=self.open_timeout)
        except NetError as exc:
            self.counters["direct_dial_failed"] += 1
            self.directory.forget(peer)  # ask again: it may have restarted on another port
            log.debug("direct dial failed", extra={"peer": peer[:16], "error": str(exc)[:200]})
            return None

    async def _accept(self, peer: str, stream: LinkStream) -> None:
        nursery = self._nursery
        subscriber = peer not in self.peers
        if subscriber:  # a non-validator may listen to what we broadcast, within a bounded number of slots
            member = self.is_member(peer)
            held = self.subscribers() | self._listening  # a slot is taken from accept on, not from the handshake
            same = sum(1 for p in held if self.is_member(p) == member)
            ok = same < (self.max_subscribers if member else self.max_outsiders) and peer not in held \
                and peer not in self._sessions
        else:
            ok = peer < self.p2p.peer_id
        if nursery is None or not ok or self._banned(peer):
            self.counters["rejected_streams"] += 1
            return  # requests.py resets the stream
        done = trio.Event()
        if subscriber:
            self._listening.add(peer)

        async def owned() -> None:
            try:
                await self._session(peer, stream, subscriber=subscriber)
            finally:
                self._listening.discard(peer)
                done.set()

        nursery.start_soon(owned)  # the session belongs to our nursery; libp2p's handler task only waits
        await done.wait()

    # ---------------------------------------------------------------- one stream

    async def _session(self, peer: str, stream: LinkStream, *, subscriber: bool = False) -> None:
        self.counters["libp2p_sessions" if isinstance(stream, Stream) else "direct_sessions"] += 1
        s = _Session(peer, stream, PeerQueue(self.max_queue_bytes, self.resend_after),
                     RateBudget(self.max_msgs_per_sec, self.max_bytes_per_sec), subscriber=subscriber)
        try:
            with s.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, s)
                    nursery.start_soon(self._reader, s)
        except Exception:  # a bug here must cost one session, not the node
            log.exception("consensus session failed", extra={"peer": peer[:16]})
        finally:
            if self._sessions.get(peer) is s:
                del self._sessions[peer]
                self.counters["disconnects"] += 1
                self.counters["dropped"] += len(s.queue)
                self._notify()
            await stream.reset()

    def _established(self, s: _Session) -> None:
        old = self._sessions.get(s.peer)
        if old is not None:
            old.scope.cancel()  # the newer stream wins
        self._sessions[s.peer] = s
        self.counters["connects"] += 1
        self._notify()
        if self.on_connect is not None and not s.subscriber:
            self.on_connect(s.peer)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _writer(self, s: _Session) -> None:
        try:
            with trio.fail_after(self.write_timeout):
                await s.stream.write(encode_frames([HELLO]))
            while True:
                await s.wakeup.wait()
                if self.tick:
                    await trio.sleep(self.tick)
                else:  # one scheduling pass: what the same consensus step queues joins this write (a sleep that
                    await trio.lowlevel.checkpoint()  # expires costs ~0.1 ms of CPU per write, per peer)
                s.wakeup = trio.Event()
                batch = s.queue.take_all()
                if not batch:
                    continue
                buf = encode_frames(batch)
                with trio.fail_after(self.write_timeout):
                    await s.stream.write(buf)
                self.counters["sent"] += len(batch)
                self.counters["bytes_out"] += len(buf)
                self.counters["writes"] += 1
        except trio.TooSlowError:
            # (p9) a peer that stops reading stalls our writes; its queue keeps dropping meanwhile
            self.counters["write_timeouts"] += 1
        except NetError as exc:
            log.debug("consensus stream write failed", extra={"peer": s.peer[:16], "error": str(exc)[:200]})
        s.scope.cancel()

    async def _reader(self, s: _Session) -> None:
        decoder = FrameDecoder(self.max_frame)
        hello = False
        try:
            with trio.fail_after(self.write_timeout) as hello_deadline:
                while True:
                    chunk = await s.stream.read(READ_CHUNK)
                    if not chunk:
                        raise NetError("stream ended")
                    self.counters["bytes_in"] += len(chunk)
                    for frame in decoder.feed(chunk):
                        if not s.budget.spend(len(frame), trio.current_time()):
                            raise _CutOff("over its message or byte budget")
                        if not hello:
                            if frame != HELLO:
                                raise _CutOff("no hello")
                            hello = True
                            hello_deadline.deadline = float("inf")
                            self._established(s)
                        elif s.subscriber:
                            raise _CutOff("a subscriber sends nothing after its hello")
                        else:
                            self._deliver(s.peer, frame)
        except FrameTooBig as exc:
            self.cut_off(s.peer, str(exc))
        except _CutOff as exc:
            self.cut_off(s.peer, str(exc))
        except trio.TooSlowError:
            log.debug("consensus peer sent no hello", extra={"peer": s.peer[:16]})
        except NetError as exc:
            log.debug("consensus stream read failed", extra={"peer": s.peer[:16], "error": str(exc)[:200]})
        s.scope.cancel()

    def _deliver(self, peer: str, frame: bytes) -> None:
        h, now = digest(frame), trio.current_time()
        s = self._sessions.get(peer)
        if s is not None:
            s.queue.mark_sent(h, now)  # it has this one: never relay it back on this connection
        if self._delivered.seen(h, now):
            self.counters["duplicates_in"] += 1
            return
        try:
            self._inbound_send.send_nowait((peer, frame))
        except trio.WouldBlock:
            self.counters["inbound_overflow"] += 1  # keep reading (p9); the sender's rebroadcast repairs it
            return
        self._delivered.add(h, now)
        self.counters["received"] += 1
