"""Start-up: when libp2p starts, and the gate a validator waits at before its first height."""

from __future__ import annotations

import logging

import trio
from flnode.consensus import Tendermint

from .head import Head
from .net import ConsensusTransport, P2PNode, peer_id_of
from .seat import Seat
from .sync import BlockSync

P2P_DEFER_MAX_S = 20.0  # libp2p starts after the first commit, or after this long without one
log = logging.getLogger("flnode.startup")


class Startup:
    def __init__(self, head: Head, net: P2PNode, transport: ConsensusTransport, seat: Seat, machine: Tendermint,
                 sync: BlockSync, *, direct_peers: bool) -> None:
        self.head, self.net, self.transport, self.seat, self.machine, self.sync = (
            head, net, transport, seat, machine, sync)
        self.direct_peers = direct_peers
        self.links_up = trio.Event()  # linked to 2/3+ of the power: updates sent before would reach too few

    def defer_p2p(self) -> bool:
        """A validator starting a chain from genesis whose validators' direct link addresses are configured
        needs no libp2p to link up and commit; libp2p's import and connections (~1.5 s of CPU per process) wait
        until then. Measured: 16 and 32 processes starting together on 2 cores reach their first commit that much
        sooner. A node restarting on an existing chain may need blocks from peers: it starts libp2p at once."""
        return (self.seat.voting and self.direct_peers and self.head.height == 0
                and self.transport.direct is not None)

    async def start_p2p_later(self, nursery: trio.Nursery) -> None:
        start = self.head.height
        with trio.move_on_after(P2P_DEFER_MAX_S):  # if consensus cannot commit alone, libp2p may be what is missing
            while self.head.height == start and not self.sync.ahead_seen:
                with trio.move_on_after(0.5):  # ahead_seen has no wake-up of its own
                    await self.head.wait_for(start + 1)
        await nursery.start(self.net.run)
        log.info("libp2p started", extra={"height": self.head.height, "addrs": ",".join(self.net.listen_addrs())})

    async def wait_for_quorum(self) -> None:
        """A validator starts its first height (after start or restart) only once it is connected to peers that,
        with itself, hold more than 2/3 of the voting power, so round 0 is not wasted."""
        if self.seat.voting:
            vs = self.head.validator_set(self.head.next_height) or self.machine.validators
            powers = {peer_id_of(k): p for k, p in vs.powers.items()}
            own = powers.get(self.net.peer_id, 0)
            if not self.transport.quorum_linked(powers, own):
                log.info("waiting for peers holding more than 2/3 of the voting power")
                await self.transport.wait_quorum_linked(powers, own)
                log.info("start-up gate open", extra={"peers": len(self.transport.connected())})
        self.links_up.set()
