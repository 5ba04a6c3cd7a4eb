"""Block sync: catch up from peers that are ahead, and serve our blocks and tip to peers that are behind.

A node learns it is behind from messages of later heights (noted by `saw_height`) or from a long stall; it then
asks the peer that showed it, or every connected peer's tip, for batches of certified blocks. Each block is checked
against the one certificate check of chain/verify before the consensus driver gets it as a CommitReceived; the
driver's commit path executes and stores it as any other decided block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio
from flnode.consensus import CommitReceived
from flnode.node.app import AppState
from flnode.node.chain.store import ChainStore
from flnode.node.chain.verify import check_certified_link
from flnode.node.metrics import Metrics
from flnode.node.net import NetError, P2PNode
from flnode.protocol.errors import ProtocolError, ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import BlockRequest, BlockResponse, Status

from .store_worker import StoreWorker

log = logging.getLogger("flnode.sync")

BLOCKS_PROTOCOL = "/flnode/blocks/1.0.0"
STATUS_PROTOCOL = "/flnode/status/1.0.0"
SYNC_BATCH = 32
AHEAD_GRACE_S = 1.0  # how long a peer's later height may wait for our own commit before we sync
STALL_POLL_S = 6.0  # with no sign of a later height, peers' tips are polled only after this long without a commit
APPLY_WAIT_S = 60.0  # a synced block not applied within this is given up on (the next pass asks again)


class Tip(Protocol):
    """What sync reads of the node: the committed tip, and a wait for a height (node/head.py)."""

    genesis: Genesis
    state: AppState
    last_block_hash: bytes

    async def wait_for(self, height: int) -> None: ...


class BlockSync:
    def __init__(self, tip: Tip, net: P2PNode, store: ChainStore, worker: StoreWorker, metrics: Metrics,
                 deliver: Any, reachable: Callable[[], list[str]] | None = None) -> None:
        self.tip, self.net, self.store, self.worker, self.metrics = tip, net, store, worker, metrics
        self.reachable = reachable or net.connected_peers  # peers a request can go to
        self.deliver = deliver  # async: hands a CommitReceived to the consensus driver
        self.behind = trio.Event()  # set when a message shows peers at a higher height
        self.ahead_seen = False
        self.ahead_of_us: tuple[int, str | None] = (0, None)  # a height some peer committed, and that peer
        self.last_commit = 0.0  # trio clock
        self.target = 0  # the height a sync in progress (or the last one) catches up to

    def committed_elsewhere(self, height: int) -> bool:
        """Whether peers are known to have committed `height` already (a block of it comes by sync)."""
        return height <= max(self.ahead_of_us[0], self.target)

    def register(self) -> None:
        self.net.set_handler(BLOCKS_PROTOCOL, self.serve_blocks)
        self.net.set_handler(STATUS_PROTOCOL, self.serve_status)

    def saw_height(self, height: int, peer: str | None) -> None:
        """A message of `height` arrived: if it is past our next height, its sender committed height - 1."""
        if height <= self.tip.state.height + 1:
            return
        if height - 1 > self.ahead_of_us[0]:
            self.ahead_of_us = (height - 1, peer)
        if not self.ahead_seen:
            self.ahead_seen = True
            self.behind.set()

    def peer_ahead(self, peer: str | None) -> None:
        """A message too far ahead for the admission gate came from `peer`: it has committed at least the height
        after our next. Only that much is believed (the message itself cannot be checked without its height's
        validator set), and it starts a sync at once: a validator that fell two heights behind a fast network
        hears nothing it can use until it catches up, so waiting for the stall poll cost it seconds per fall."""
        self.saw_height(self.tip.state.height + 3, peer)

    def committed(self) -> None:
        self.last_commit = trio.current_time()

    # ---------------------------------------------------------------- serving peers

    async def serve_blocks(self, peer: str, request: bytes) -> bytes:
        req = BlockRequest.decode(request)
        return await self.worker.run(self._read_blocks, req.from_height, min(req.max_blocks, SYNC_BATCH))

    def _read_blocks(self, start: int, count: int) -> bytes:
        entries = []
        top = self.store.latest_height()
        for h in range(start, min(top, start + count - 1) + 1):
            block, cert = self.store.get_block(h), self.store.get_certificate(h)
            if block is None or cert is None:
                break
            entries.append((block, cert))
        return BlockResponse(tuple(entries)).encode()

    async def serve_status(self, peer: str, request: bytes) -> bytes:
        s = self.tip.state
        return Status(s.height, self.tip.last_block_hash, s.model_hash).encode()

    # ---------------------------------------------------------------- catching up

    async def run(self) -> None:
        """Asks for peers' tips when a message shows the network is ahead of us, and otherwise only when no height
        has committed for a while: status polling is not on the path of a normal round."""
        while True:
            with trio.move_on_after(2.0):
                await self.behind.wait()
            self.behind = trio.Event()
            now = trio.current_time()
            if now - self.last_commit < STALL_POLL_S and not self.ahead_seen:
                continue  # no sign of being behind: a slow round is not a reason to poll (at 32 nodes it was)
            if self.ahead_seen:
                # Being one commit behind the fastest peer is the normal state of a busy network: wait a moment
                # for our own commit before asking anyone (at 16 nodes every node polled every peer every height).
                # Two behind is not: nothing of the network's height passes our gate until we catch up.
                one_behind = self.ahead_of_us[0] <= self.tip.state.height + 1
                with trio.move_on_after(AHEAD_GRACE_S if one_behind else 0):
                    while self.tip.state.height < self.ahead_of_us[0]:  # the target may move meanwhile
                        await self.tip.wait_for(self.tip.state.height + 1)
                self.ahead_seen = False
                target, ahead_peer = self.ahead_of_us
                if self.tip.state.height >= target and trio.current_time() - self.last_commit < STALL_POLL_S:
                    continue
                if ahead_peer is not None and ahead_peer in self.reachable():
                    await self.sync_from(ahead_peer, target)  # the peer that showed it: no status poll
                    if self.tip.state.height >= target:
                        continue
            for peer in self.reachable():
                try:
                    raw = await self.net.request(peer, STATUS_PROTOCOL, b"", max_response=256, timeout=5.0)
                    status = Status.decode(raw)
                except (NetError, ProtocolError):
                    continue
                if status.height > self.tip.state.height:
                    await self.sync_from(peer, status.height)

    async def sync_from(self, peer: str, target: int) -> None:
        tip = self.tip
        self.target = max(self.target, target)
        while tip.state.height < target:
            try:
                raw = await self.net.request(
                    peer, BLOCKS_PROTOCOL, BlockRequest(tip.state.height + 1, SYNC_BATCH).encode(),
                    max_response=BlockResponse.MAX_SIZE, timeout=30.0,
                )
                resp = BlockResponse.decode(raw)  # a block whose body does not match its header does not decode
            except (NetError, ProtocolError) as exc:
                self.metrics.inc("sync_failures")
                log.info("sync request failed", extra={"peer": peer[:16], "error": str(exc)[:200]})
                return
            if not resp.entries:
                return
            for block, cert in resp.entries:
                if block.height != tip.state.height + 1:
                    return
                try:
                    check_certified_link(tip.genesis, tip.state, tip.last_block_hash, block, cert)
                except ValidationError as exc:
                    self.metrics.inc("rejected_bad_sync_block")
                    log.info("rejected synced block", extra={"peer": peer[:16], "why": str(exc)[:200]})
                    return
                # Certified, so committed elsewhere: its blobs are fetched at once, with no wait for bundles of
                # a height gossip has left (the batch runs past the target a gate-refused message showed).
                self.target = max(self.target, block.height)
                log.info("synced block", extra={"height": block.height, "from": peer[:16]})
                before = tip.state.height
                await self.deliver(CommitReceived(block, cert))
                with trio.move_on_after(APPLY_WAIT_S):
                    await tip.wait_for(before + 1)
                if tip.state.height == before:
                    return
