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

from .admission import UPDATES_AHEAD, AdmissionGate
from .blobs import BlobService
from .early_updates import EarlyUpdates
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
        self.early = EarlyUpdates()  # updates refused as too far ahead, offered to the gate after each commit

    def validate_gossip(self, topic: str, data: bytes, peer: str | None = None) -> bool:
        """libp2p topic validator: only what the admission gate admits is re-gossiped (a trainer's update too far
        ahead is kept: gossip will not deliver it again)."""
        if self.gate.admit(topic, data, peer) is not None:
            return True
        if self.gate.last_reason == "ahead_height":
            self._keep_early(peer, data)
        return False

    async def run_gossip(self) -> None:
        async for item in self.net.inbound:
            msg = self.gate.admit(item.topic, item.data, None)
            if msg is not None:
                await self.on_message(msg, item.from_peer)
            elif self.gate.last_reason == "ahead_height":
                self._ahead(item.from_peer, item.data)

    async def run_consensus(self) -> None:
        async for peer, data in self.transport.inbound:
            msg = self.gate.admit(None, data, peer)
            if msg is None:
                if self.gate.last_reason in CUT_OFF_REASONS:
                    self.transport.cut_off(peer, self.gate.last_reason or "")
                elif self.gate.last_reason == "ahead_height":
                    self._ahead(peer, data)
                continue
            await self.on_message(msg, peer)

    def _ahead(self, peer: str | None, data: bytes) -> None:
        """A message past the gate's window: its sender is ahead of us, and an update of it is kept for later."""
        self._keep_early(peer, data)
        self.sync.peer_ahead(peer)

    def _keep_early(self, peer: str | None, data: bytes) -> None:
        msg = self.gate.last_refused
        if isinstance(msg, UpdateBundle | UpdateAnnouncement):
            ann = msg.announcement if isinstance(msg, UpdateBundle) else msg
            if self.early.park(peer, ann.height, data, self.head.next_height):
                self.metrics.inc("early_updates_parked")

    def committed(self) -> None:
        """After each commit: the kept updates whose height is now within the gate's window go through it."""
        due = self.early.due(self.head.next_height, UPDATES_AHEAD)
        if due:
            self.spawn("early_updates", self._readmit, due)

    async def _readmit(self, frames: list[tuple[str | None, bytes]]) -> None:
        for peer, data in frames:
            msg = self.gate.admit(None, data, peer)
            if msg is not None:
                self.metrics.inc("early_updates_admitted")
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
