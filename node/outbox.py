"""This node's own messages out: its update announcement, its membership transactions, and bringing a validator
that just connected up to date."""

from __future__ import annotations

from collections.abc import Callable

import trio
from flnode.consensus import Tendermint, TimeoutFired, TimeoutKind
from flnode.protocol.topics import Topics

from .admission import AdmissionGate
from .head import Head
from .net import ConsensusTransport, P2PNode
from .peers import Peers
from .seat import Seat
from .supervise import Tasks


class Outbox:
    def __init__(self, topics: Topics, head: Head, net: P2PNode, transport: ConsensusTransport, peers: Peers,
                 seat: Seat, gate: AdmissionGate, machine: Tendermint, tasks: Tasks) -> None:
        self.topics, self.head, self.net, self.transport, self.peers = topics, head, net, transport, peers
        self.seat, self.gate, self.machine, self.tasks = seat, gate, machine, tasks
        self.own_update: Callable[[], tuple[int, bytes] | None] = lambda: None  # the trainer's latest (height, bytes)
        self.rebroadcast: trio.MemorySendChannel | None = None  # the driver's inbox

    def admits(self, data: bytes) -> bool:
        """Our own announcement passes the same gate as anyone's."""
        return self.gate.admit(self.topics.updates, data, None) is not None

    async def send_update(self, data: bytes, height: int) -> None:
        if self.seat.voting:
            self.transport.broadcast(data, height=height, round=0)
        if not self.seat.voting or self.transport.subscribers() or self._listeners_beyond_validators():
            await self.net.publish(self.topics.updates, data)

    def send_member_tx(self, data: bytes, height: int) -> None:
        """To the validators directly (when we are one: a listener's streams carry nothing out), and on gossip
        for everyone else."""
        self.transport.broadcast(data, height=height, round=0)
        if self.tasks.nursery is not None:
            self.tasks.spawn("publish_member_tx", self.net.publish, self.topics.updates, data)

    def validator_connected(self, peer: str) -> None:
        """Our update of this height and, through the machine's rebroadcast, what we signed in this round (the
        same bytes are sent once per connection, so only the new peer gets them)."""
        own = self.own_update()
        if own is not None and own[0] == self.head.next_height and self.seat.voting:
            self.transport.broadcast(own[1], height=own[0], round=0)
        h, r = getattr(self.machine, "height", 0), getattr(self.machine, "round", -1)
        if h == self.head.next_height and r >= 0 and self.rebroadcast is not None:
            try:
                self.rebroadcast.send_nowait(TimeoutFired(TimeoutKind.REBROADCAST, h, r))
            except trio.WouldBlock:
                pass  # busy: the scheduled rebroadcast will do it

    def _listeners_beyond_validators(self) -> bool:
        """Someone who is not a validator is connected (a trainer or observer): announcements go on gossip too."""
        return any(p not in self.peers.validator_peers for p in self.net.connected_peers())
