"""Consensus messages over one long-lived link per validator pair (a direct link, or a libp2p stream; not gossip).

Why (docs/LIBP2P.md, "Scaling"): gossipsub in py-libp2p 0.8.1 costs ~0.5 ms CPU per RPC, sends IDONTWANT storms
and relays every vote to every mesh peer; at 16 validators it livelocks. Here every message is one length-framed
write to each validator, batched per peer, with bounded per-peer queues (the CometBFT consensus-reactor pattern).
Loss recovery is the machine's own rebroadcast: the transport is bounded and fair, never reliable. Its parts: the
sans-I/O bookkeeping (flow.py), one link's writer and reader (link_session.py), the direct side (directory.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from .directory import DirectConfig, DirectLinks, Directory
from .flow import PeerQueue, RateBudget, SeenSet, frame_id, listener_slot_free
from .frames import NetError, Stream
from .host import P2PNode
from .link_session import LinkLimits, LinkStream, Session
from .quorum import has_quorum

log = logging.getLogger("flnode.net.consensus")

CONSENSUS_PROTOCOL = "/flnode/consensus/1.0.0"

COUNTERS = (
    "sent", "received", "bytes_in", "bytes_out", "writes", "dropped", "cut_off", "duplicates_in",
    "duplicates_out", "inbound_overflow", "oversize", "connects", "disconnects", "dial_failed",
    "write_timeouts", "rejected_streams", "skipped_peer_has_it", "direct_sessions", "libp2p_sessions",
    "direct_dial_failed", "direct_accepted", "direct_handshake_failed", "direct_no_port", "direct_no_host",
    "direct_requests_accepted", "direct_request_dial_failed", "listener_not_sent",
)


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
        self.max_queue_bytes, self.max_frame, self.resend_after = max_queue_bytes, max_frame, resend_after
        self.max_msgs_per_sec, self.max_bytes_per_sec = max_msgs_per_sec, max_bytes_per_sec
        self.write_timeout, self.open_timeout, self.cutoff_backoff = write_timeout, open_timeout, cutoff_backoff
        self.tick, self.protocol_id = tick, protocol_id
        self.max_subscribers = max_subscribers  # listener slots for members (trainers, admitted nodes)
        self.max_outsiders = max_outsiders  # and a separate few for anyone else, so outsiders cannot take them all
        self.is_member = is_member or (lambda peer: False)
        self.dial_all = dial_all  # a listener (not a validator) dials every validator, whatever the id order
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._inbound_send, self.inbound = trio.open_memory_channel[tuple[str, bytes]](inbound_buffer)
        self._delivered = SeenSet(65536, redeliver_after)
        self._sessions: dict[str, Session] = {}
        self._banned_until: dict[str, float] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._dialing: set[str] = set()  # peers a dial loop runs for
        self._listening: set[str] = set()  # non-validators whose accepted stream holds a listener slot
        # called when a validator's stream is up: what was sent before it connected never reached it
        self.on_connect: Callable[[str], None] | None = None
        p2p.set_stream_handler(protocol_id, self._accept)
        self.direct = direct
        self.links = DirectLinks(p2p, direct, self._accept, self.counters, open_timeout) if direct else None
        self.directory = self.links.directory if self.links is not None else Directory()

    # ---------------------------------------------------------------- API

    def connected(self) -> set[str]:
        return {p for p, s in self._sessions.items() if not s.subscriber}

    def reachable(self) -> list[str]:
        """Peers a request can go to: libp2p connections, and validators linked to us (over a direct link a
        request needs no libp2p connection)."""
        return list(dict.fromkeys([*self.p2p.connected_peers(), *sorted(self.connected())]))

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
        h, now = frame_id(data), trio.current_time()
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
        await self._wait(lambda: self.quorum_linked(powers, self_power))

    async def wait_connected(self, peers: Iterable[str]) -> None:
        want = set(peers)
        await self._wait(lambda: want <= self._sessions.keys())

    async def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._changed.wait()

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
                if self.links is not None:
                    await self.links.start(nursery, lambda: self.peers)
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
                stream: LinkStream | None = None if self.links is None else await self.links.dial_session(peer)
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

    async def _accept(self, peer: str, stream: LinkStream) -> None:
        nursery = self._nursery
        subscriber = peer not in self.peers
        if subscriber:  # a non-validator may listen to what we broadcast, within a bounded number of slots
            held = self.subscribers() | self._listening  # a slot is taken from accept on, not from the handshake
            ok = peer not in self._sessions and listener_slot_free(peer, held, self.is_member, self.max_subscribers,
                                                                   self.max_outsiders)
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

    async def _session(self, peer: str, stream: LinkStream, *, subscriber: bool = False) -> None:
        self.counters["libp2p_sessions" if isinstance(stream, Stream) else "direct_sessions"] += 1
        s = Session(peer, stream, PeerQueue(self.max_queue_bytes, self.resend_after),
                    RateBudget(self.max_msgs_per_sec, self.max_bytes_per_sec), subscriber=subscriber)
        try:
            await s.run(LinkLimits(self.max_frame, self.write_timeout, self.tick), self.counters,
                        on_hello=self._established, on_frame=self._deliver, cut_off=self.cut_off)
        except Exception:  # a bug here must cost one session, not the node
            log.exception("consensus session failed", extra={"peer": peer[:16]})
        finally:
            if self._sessions.get(peer) is s:
                del self._sessions[peer]
                self.counters["disconnects"] += 1
                self.counters["dropped"] += len(s.queue)
                self._notify()
            await stream.reset()

    def _established(self, s: Session) -> None:
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

    def _deliver(self, peer: str, frame: bytes) -> None:
        h, now = frame_id(frame), trio.current_time()
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
