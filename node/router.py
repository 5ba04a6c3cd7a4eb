"""The router: every message from the network passes the admission gate, then goes to its owner (votes and
proposals to the driver, updates and blobs to the mempool and blob service, evidence to the evidence pool,
membership transactions to their mempool)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from flnode.consensus import ProposalReceived, VoteReceived
from flnode.node.metrics import Metrics
from flnode.node.net import P2PNode, peer_id_of
from flnode.protocol.genesis import Genesis
from flnode.protocol.membership import MembershipTx
from flnode.protocol.messages import (
    DuplicateVoteEvidence,
    Message,
    Proposal,
    UpdateAnnouncement,
    UpdateBundle,
    Vote,
    encode_gossip,
)

from .admission import AdmissionGate
from .blobs import BlobService
from .head import Head
from .mempool import Mempool
from .net import ConsensusTransport
from .peers import Peers
from .sync import BlockSync
from .timing import HeightTiming

log = logging.getLogger("flnode.daemon")

CUT_OFF_REASONS = {"malformed", "bad_signature", "unexpected_type", "wrong_topic"}  # no honest node sends these


class Router:
    def __init__(self, genesis: Genesis, head: Head, gate: AdmissionGate, net: P2PNode,
                 transport: ConsensusTransport, peers: Peers, sync: BlockSync, mempool: Mempool, blobs: BlobService,
                 metrics: Metrics, timing: HeightTiming, *, deliver: Callable[[Any], Awaitable[None]],
                 voting: Callable[[], bool], spawn: Callable[..., None]) -> None:
        self.genesis, self.head, self.gate, self.net, self.transport = genesis, head, gate, net, transport
        self.peers, self.sync, self.mempool, self.blobs, self.metrics = peers, sync, mempool, blobs, metrics
        self.timing, self.deliver, self.voting, self.spawn = timing, deliver, voting, spawn

    def validate_gossip(self, topic: str, data: bytes, peer: str | None = None) -> bool:
        """libp2p topic validator: only what the admission gate admits is re-gossiped."""
        return self.gate.admit(topic, data, peer) is not None

    async def run_gossip(self) -> None:
        async for item in self.net.inbound:
            msg = self.gate.admit(item.topic, item.data, None)
            if msg is not None:
                await self.on_message(msg, item.from_peer)
            elif self.gate.last_reason == "ahead_height":
                self.sync.peer_ahead(item.from_peer)

    async def run_consensus(self) -> None:
        async for peer, data in self.transport.inbound:
            msg = self.gate.admit(None, data, peer)
            if msg is None:
                if self.gate.last_reason in CUT_OFF_REASONS:
                    self.transport.cut_off(peer, self.gate.last_reason or "")
                elif self.gate.last_reason == "ahead_height":
                    self.sync.peer_ahead(peer)
                continue
            await self.on_message(msg, peer)

    async def on_message(self, msg: Message, from_peer: str | None) -> None:
        self.metrics.inc("gossip_received")
        self.peers.note(msg)
        self.sync.saw_height(getattr(msg, "height", 0), from_peer)
        if isinstance(msg, Vote):
            await self.deliver(VoteReceived(msg))
        elif isinstance(msg, Proposal):
            if msg.height == self.head.next_height:
                self.timing.mark("proposal_t")
            await self.deliver(ProposalReceived(msg))
        elif isinstance(msg, UpdateBundle):
            await self.blobs.put(msg.announcement.blob_hash, msg.blob, msg.announcement.height)
            self.on_announcement(msg.announcement, from_peer)
        elif isinstance(msg, UpdateAnnouncement):
            self.on_announcement(msg, from_peer)
        elif isinstance(msg, DuplicateVoteEvidence):
            self.pool_evidence(msg)
        elif isinstance(msg, MembershipTx) and self.mempool.members.add(msg) and self.voting():
            self.transport.broadcast(encode_gossip(msg), height=self.head.next_height, round=0)  # relay once

    def on_announcement(self, ann: UpdateAnnouncement, from_peer: str | None) -> None:
        if self.mempool.add_update(ann):
            log.debug("update announced", extra={"height": ann.height, "author": self.genesis.name_of(ann.author)})
            if not self.blobs.holds(ann.blob_hash):
                holders = [peer_id_of(ann.author)] + ([from_peer] if from_peer else [])
                self.spawn("fetch", self.fetch_announced, ann, holders)

    async def fetch_announced(self, ann: UpdateAnnouncement, holders: list[str]) -> None:
        await self.blobs.fetch_until(
            ann.blob_hash, lambda: list(dict.fromkeys(holders + self.transport.reachable())), ann.blob_size,
            give_up=lambda: self.head.height >= ann.height, height=ann.height,
        )

    def pool_evidence(self, ev: DuplicateVoteEvidence) -> None:
        why = self.mempool.add_evidence(ev)
        if why is not None and why != "duplicate":
            log.info("evidence not pooled", extra={"validator": self.genesis.name_of(ev.validator), "why": why})
            self.metrics.inc(f"evidence_dropped_{why}")
