"""This node's seat in the validator set: the set the machine runs on at each height, whether this node votes
(or only listens), and, under open membership, which validators it keeps direct links with."""

from __future__ import annotations

import logging

from flnode.consensus import Tendermint, ValidatorSet

from .head import Head
from .net import ConsensusTransport
from .peers import Peers

log = logging.getLogger("flnode.seat")


class Seat:
    def __init__(self, me: bytes, head: Head, machine: Tendermint, peers: Peers, transport: ConsensusTransport,
                 voting: bool) -> None:
        self.me, self.head, self.machine, self.peers, self.transport = me, head, machine, peers, transport
        self.voting = voting

    def before_height(self) -> None:
        """Give the machine the set in force at the next height (before its StartHeight)."""
        vs = self.head.validator_set(self.head.next_height)
        if vs is not None and vs is not self.machine.validators:
            if vs.powers != self.machine.validators.powers:
                log.warning("validator set changed", extra={"height": self.head.next_height,
                                                            "validators": len(vs.powers)})
            self.machine.set_validators(vs)
        if vs is not None and not self.head.state.membership.empty():
            self.follow(vs)

    def follow(self, vs: ValidatorSet) -> None:
        """Open membership: direct links follow the set (a validator of the next height is a peer one height
        early, so its links are up when it starts voting), and this node votes, or only listens, by its power."""
        changed = self.peers.follow(vs, self.head.validator_set(self.head.height + 2))
        voting = vs.power(self.me) > 0
        if changed or voting != self.voting:
            self.voting = voting
            self.transport.set_validators(self.peers.validator_peers, dial_all=not voting)
