"""The validity checker: answers the machine's ValidateValue once the block's data is here, with the one verdict
cache of the height (block hash -> executed result), and the prevote-time fairness check (node/app/fairness.py).

Missing data is not "invalid": no answer is given until it arrives (the machine's timeouts go on meanwhile),
and it is never cached as a verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from flnode.consensus import ValueValidated
from flnode.node.app import AppState
from flnode.node.app.blocks import check_block, missing_blobs
from flnode.node.app.fairness import unfair_reason
from flnode.node.metrics import Metrics
from flnode.node.net import peer_id_of
from flnode.protocol.errors import ProtocolError, ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import short
from flnode.protocol.messages import Block, UpdateBundle

from .blobs import BlobService
from .head import Head
from .mempool import Mempool
from .timing import HeightTiming

log = logging.getLogger("flnode.daemon")

BUNDLE_GRACE_S = 0.5  # a proposal naming a small update we lack waits this long for its bundle before fetching
Result = tuple[AppState, Any]  # the state after the block, and its receipt


class Checker:
    def __init__(self, genesis: Genesis, me: bytes, head: Head, mempool: Mempool, blobs: BlobService,
                 metrics: Metrics, timing: HeightTiming, send: Callable[[Any], Awaitable[None]], *,
                 voting: Callable[[], bool], committed_elsewhere: Callable[[int], bool],
                 connected: Callable[[], list[str]]) -> None:
        self.genesis, self.me, self.head, self.mempool, self.blobs = genesis, me, head, mempool, blobs
        self.metrics, self.timing, self.send = metrics, timing, send
        self.voting = voting  # this node has voting power now
        self.committed_elsewhere = committed_elsewhere  # peers committed that height (we are syncing)
        self.connected = connected
        self._results: dict[bytes, Result] = {}  # block hash -> result, for the current height only
        self._validating: set[bytes] = set()

    def remember(self, block: Block, result: Result) -> None:
        self._results[block.hash()] = result

    def committed(self) -> None:
        self._results.clear()

    async def validate(self, height: int, round_: int, block: Block) -> None:
        """Answer valid(v) (and fair) for a proposal of the current height once its data is here."""
        bh = block.hash()
        if bh in self._validating:
            return
        self._validating.add(bh)
        received = trio.current_time()
        try:
            if bh not in self._results and not await self.await_blobs(block, lambda: self.head.next_height != height):
                return  # the height moved on
            result = await self.check(block)
            if self.head.next_height == height:
                fair = result is None or self.fair(block, received)
                await self.send(ValueValidated(height, round_, bh, result is not None, fair))
        finally:
            self._validating.discard(bh)

    def fair(self, block: Block, received: float) -> bool:
        """A fresh proposal did not censor updates we held in time."""
        if block.header.proposer == self.me or not self.voting():
            return True
        since = self.timing.started_at
        held = self.mempool.held(block.height, since, received)
        deadline = since + self.genesis.rules.collect_timeout_ms / 1000 if self.timing.by_commit else None
        why = unfair_reason(self.genesis, self.head.state, block, held, received_at=received, deadline=deadline)
        if why is None:
            return True
        log.warning("no prevote for an unfair proposal", extra={"height": block.height, "block": short(block.hash()),
                                                                 "proposer": self.genesis.name_of(block.header.proposer),
                                                                 "why": why})
        self.metrics.inc("proposals_unfair")
        return False

    def holders(self, block: Block, blob_hash: bytes) -> list[str]:
        """The likeliest holders of a blob the block names (its proposer, its author), then every connected peer."""
        first = [peer_id_of(block.header.proposer)]
        first += [peer_id_of(u.author) for u in block.updates if u.blob_hash == blob_hash]
        return list(dict.fromkeys(first + self.connected()))

    async def await_blobs(self, block: Block, give_up: Callable[[], bool]) -> bool:
        """Fetch every blob the block names (in parallel, proposer first); True once all are here."""
        unknown = missing_blobs(block, self.blobs.holds)
        if not unknown:
            return True
        inline = {u.blob_hash for u in block.updates if u.blob_size <= UpdateBundle.INLINE_MAX}.intersection(unknown)
        # Their authors' bundles are usually on the way: a fetch would race them. Not for a block peers committed
        # already (we are syncing): no bundle of its height is coming, and a wait per block would hold a syncing
        # node to the network's pace, so it never caught up.
        if inline and not self.committed_elsewhere(block.height):
            with trio.move_on_after(BUNDLE_GRACE_S):
                while not all(self.blobs.holds(h) for h in inline):
                    await self.mempool.arrivals.wait()
        missing = [h for h in unknown if not self.blobs.holds(h) and not await self.blobs.has(h)]
        if not missing:
            return True
        size = {u.blob_hash: u.blob_size for u in block.updates}
        async with trio.open_nursery() as n:
            for h in missing:
                n.start_soon(
                    lambda h=h: self.blobs.fetch_until(
                        h, lambda: self.holders(block, h), size[h], give_up, height=block.height
                    )
                )
        return all(self.blobs.holds(h) for h in missing)

    async def check(self, block: Block) -> Result | None:
        """The block executed on the tip (off the event loop), or None if it is refused or the tip moved."""
        bh = block.hash()
        if bh in self._results:
            return self._results[bh]
        head = self.head
        state, prev = head.state, head.last_block_hash
        if block.height != state.height + 1:
            return None
        blobs = await self.blobs.readers([u.blob_hash for u in block.updates])
        t0 = trio.current_time()
        try:
            result = await trio.to_thread.run_sync(
                lambda: check_block(self.genesis, state, block, blobs, prev_block_hash=prev)
            )
        except (ValidationError, ProtocolError) as exc:
            log.warning("refusing block", extra={"height": block.height, "block": short(bh), "why": str(exc)})
            self.metrics.inc("blocks_refused")
            return None
        if head.state is not state:
            return None
        self._results[bh] = result
        self.timing.mark("execute_s", trio.current_time() - t0)
        return result
