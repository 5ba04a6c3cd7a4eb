"""The committer: applies a decided block (fetch what it names, execute, store in one transaction) and is the only
writer of the Head. The rest of the node keeps running meanwhile; a block this node cannot execute halts
consensus with a clear error and retries, it does not crash the node."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from flnode.node.app import AppState
from flnode.node.app.participant import Participant, global_metrics, trainer_record
from flnode.node.chain.store import ChainStore
from flnode.node.metrics import Metrics
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import short
from flnode.protocol.messages import Block, CommitCertificate

from .blobs import BlobService
from .checker import Checker
from .head import Head
from .store_worker import StoreWorker
from .timing import HeightTiming

log = logging.getLogger("flnode.daemon")


@dataclass(frozen=True)
class HeightApplied:
    """The committer stored this height and advanced the head: the driver starts the next one."""

    height: int
    round_time_s: float


class Committer:
    def __init__(self, genesis: Genesis, head: Head, store: ChainStore, worker: StoreWorker, blobs: BlobService,
                 checker: Checker, metrics: Metrics, timing: HeightTiming, send: Callable[[Any], Awaitable[None]],
                 *, blob_retention_heights: int, data: Participant | None,
                 spawn: Callable[..., None], on_status: Callable[[], None]) -> None:
        self.genesis, self.head, self.store, self.worker, self.blobs = genesis, head, store, worker, blobs
        self.checker, self.metrics, self.timing, self.send = checker, metrics, timing, send
        self.blob_retention_heights = blob_retention_heights
        self.data = data  # the node's own trainer: evaluates a client-defined model
        self.spawn, self.on_status = spawn, on_status
        self.on_committed: list[Callable[[], None]] = []  # called once the head advanced, before the driver hears
        self.halted: str | None = None  # why consensus cannot go on (a committed block we cannot execute)

    async def apply(self, block: Block, cert: CommitCertificate) -> None:
        height = block.height
        attempt = 0
        while True:
            await self.checker.await_blobs(block, lambda: False)
            result = await self.checker.check(block)
            if result is not None:
                break
            attempt += 1
            self.halted = f"cannot execute committed block {height} ({short(block.hash())})"
            self.metrics.set("halted", 1)
            self.metrics.inc("commit_failures")
            log.error("cannot execute a committed block: this node's state differs from 2/3+ of the validators",
                      extra={"height": height, "block": short(block.hash()), "attempt": attempt})
            self.on_status()
            await trio.sleep(min(60.0, 2.0 * attempt))
        self.halted = None
        self.metrics.set("halted", 0)
        new_state, receipt = result
        t0 = trio.current_time()

        def store_height() -> None:  # one trip to the store thread: a hop costs more than the work when busy
            self.store.commit_height(block, cert, new_state, receipt, new_state.model)  # streamed to its file
            self.store.prune_records(new_state.height + 1)

        await self.blobs.flush()  # the block's small update blobs are in their files before the height is stored
        await self.worker.run(store_height)
        if self.blob_retention_heights:
            removed: list[bytes] = []
            await self.worker.prune_blobs(new_state.height, self.blob_retention_heights, removed)
            self.blobs.forget(removed)
        round_time = self.timing.since_start()
        self.timing.mark("commit_t")
        marks = dict(self.timing.marks)
        self.head.advance(new_state, block.hash(), cert)
        self.checker.committed()
        for hook in self.on_committed:
            hook()
        self.metrics.set("height", new_state.height)
        self.metrics.inc("blocks_committed")
        log.info(
            "committed",
            extra={
                "height": height, "round": cert.round, "updates": len(block.updates),
                "model": short(new_state.model_hash), "round_s": round(round_time, 3),
                "store_ms": round((trio.current_time() - t0) * 1000, 1),
            },
        )
        self.spawn("record_metrics", self.record_metrics, new_state, marks, round_time, cert.round)
        self.on_status()
        await self.send(HeightApplied(height, round_time))

    async def record_metrics(self, state: AppState, marks: dict[str, float], round_time: float, round_: int) -> None:
        """Test accuracy is for people, not for consensus: computed after the fact, stored beside the block."""
        from flnode.node.app import load_dataset, make_task

        def evaluate() -> dict[str, Any]:
            if self.genesis.task.params:  # a participant's own model: only its client can evaluate it
                return global_metrics(self.data, state)
            _, test = load_dataset(self.genesis.task)
            task = make_task(self.genesis.task, test.x.shape[1], test.n_classes)
            m = task.evaluate(state.model, test)
            return {"test_accuracy": float(m.accuracy), "test_loss": float(m.loss)}

        info = await trio.to_thread.run_sync(evaluate)
        info.update(trainer_record(self.data, state.height))  # the own update's client metrics, or its error
        info.update({"round_time_s": round(round_time, 4), "consensus_round": round_, "time": time.time()})
        info.update({k: round(v, 4) for k, v in marks.items()})
        await self.worker.run(self.store.put_metrics, state.height, info)
        self.metrics.set("test_accuracy", info["test_accuracy"])
