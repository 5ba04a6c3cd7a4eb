"""The proposer: when the machine asks for a value (GetValue), collect ready updates until enough authors' are
here or the collection deadline passes, then build the block (node/app/blocks.py) off the event loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from flnode.consensus import ValueReady
from flnode.node.app.blocks import build_block
from flnode.node.app.fairness import wanted_authors
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import UpdateAnnouncement
from flnode.protocol.tensors import BlobReader

from .blobs import BlobService
from .checker import Checker
from .head import Head
from .mempool import Mempool
from .timing import HeightTiming

log = logging.getLogger("flnode.daemon")


class Proposer:
    def __init__(self, genesis: Genesis, me: bytes, head: Head, mempool: Mempool, blobs: BlobService,
                 checker: Checker, timing: HeightTiming, send: Callable[[Any], Awaitable[None]],
                 applying: Callable[[], bool]) -> None:
        self.genesis, self.me, self.head, self.mempool, self.blobs = genesis, me, head, mempool, blobs
        self.checker, self.timing, self.send = checker, timing, send
        self.applying = applying  # a decided block is being applied: this height needs no proposal
        self.collect_passes = 0  # collection-loop passes, for the no-spin regression test

    async def ready_updates(self, height: int) -> list[tuple[UpdateAnnouncement, BlobReader]]:
        anns = self.mempool.ready_announcements(height)
        blobs = await self.blobs.readers([a.blob_hash for a in anns])  # files, read a chunk at a time
        return [(a, blobs[a.blob_hash]) for a in anns if a.blob_hash in blobs]

    def _live(self, height: int) -> bool:
        return self.head.next_height == height and not self.applying()

    async def propose(self, height: int, round_: int) -> None:
        """Answer GetValue(height, round_) with a ValueReady, unless the height moves on first."""
        want = wanted_authors(self.genesis, self.head.state, height)
        deadline = self.timing.started_at + self.genesis.rules.collect_timeout_ms / 1000  # trio clock
        while self._live(height):
            self.collect_passes += 1
            if len(self.mempool.ready_authors(height)) >= want or trio.current_time() >= deadline:
                break
            with trio.move_on_at(deadline):
                await self.mempool.arrivals.wait()
        if not self._live(height):
            return
        head = self.head
        state, prev, last_cert = head.state, head.last_block_hash, head.last_cert
        candidates = await self.ready_updates(height)
        evidence = self.mempool.evidence.pending()
        txs = self.mempool.members.pending()
        block, new_state, receipt = await trio.to_thread.run_sync(
            lambda: build_block(
                self.genesis, state, prev_block_hash=prev, last_commit=last_cert, proposer=self.me,
                time_ms=int(time.time() * 1000), candidates=candidates, evidence=evidence, txs=txs,
            )
        )
        if head.state is not state:
            return
        self.checker.remember(block, (new_state, receipt))  # we executed it: no check of our own block
        self.timing.mark("proposal_t")
        log.info("proposing", extra={"height": height, "round": round_, "updates": len(block.updates)})
        await self.send(ValueReady(height, round_, block))
