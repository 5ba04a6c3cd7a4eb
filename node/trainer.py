"""The trainer: for every height this node trains at, fit the client on the current global model in a worker
thread (within the genesis' time budget and the node's privacy budget) and publish the signed update."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from flnode.node.app import AppState, make_update
from flnode.node.app.membership import trains_at
from flnode.node.app.participant import Participant, TrainerError, load_participant
from flnode.node.config import NodeConfig
from flnode.node.metrics import Metrics
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import short
from flnode.protocol.messages import UpdateAnnouncement, UpdateBundle, encode_gossip

from .blobs import BlobService
from .head import Head
from .member_txs import MemberTxs
from .mempool import Mempool
from .timing import HeightTiming

log = logging.getLogger("flnode.daemon")


def own_participant(genesis: Genesis, config: NodeConfig, me: bytes, members: MemberTxs,
                    data_file: Path | None) -> tuple[Participant | None, int]:
    """This node's trainer data and participant index: a genesis participant's, or a joined member's (its
    seed's shard); (None, -1) when it does not train."""
    path = str(data_file) if data_file else None
    if config.participate and me in genesis.powers:
        index = genesis.index_of(me)
        return load_participant(genesis, index, path, config.trainer), index
    if config.participate and (shard := members.own_shard()) is not None:
        return load_participant(genesis, shard[0], path, config.trainer, shard[1]), shard[0]
    return None, -1


class Trainer:
    def __init__(self, genesis: Genesis, key: NodeKey, head: Head, data: Participant, index: int,
                 mempool: Mempool, blobs: BlobService, metrics: Metrics, timing: HeightTiming, *,
                 admit: Callable[[bytes], bool], send: Callable[[bytes, int], Any],
                 links_up: trio.Event) -> None:
        self.genesis, self.key, self.head, self.data, self.index = genesis, key, head, data, index
        self.mempool, self.blobs, self.metrics, self.timing = mempool, blobs, metrics, timing
        self.admit = admit  # the admission gate's verdict on our own encoded update
        self.send = send  # async: out to the validators and, where needed, on gossip
        self.links_up = links_up  # the start-up gate opened: an update sent earlier reaches too few
        self.own_update: tuple[int, bytes] | None = None  # (height, encoded) of our latest: for a new link
        self._privacy_stopped = False  # logged once: our epsilon budget allows no further round

    async def run(self) -> None:
        await self.links_up.wait()
        trained_for = 0
        while True:
            height = self.head.next_height
            if height <= trained_for:
                await self.head.wait_for(height)
                continue
            trained_for = height
            state = self.head.state
            if not trains_at(self.genesis, state, self.key.public_key, height):  # not (yet, or any more)
                continue
            if not await self.privacy_allows(state):  # one more round would exceed our epsilon budget
                continue
            t0 = trio.current_time()
            # A worker thread: the loop keeps its turns while a client trains; a fit past the budget is abandoned
            # here, and the client's lock fails later rounds until it returns.
            try:
                with trio.fail_after(self.genesis.task.train_budget_ms / 1000 + 5.0):
                    ann, blob, result = await trio.to_thread.run_sync(
                        make_update, self.genesis, self.key, state, self.data, self.index,
                        abandon_on_cancel=True,  # type: ignore[call-arg]  # mypy: keyword after *Unpack[Ts]
                    )
            except (TrainerError, trio.TooSlowError) as exc:
                kind, line = (exc.kind, exc.line) if isinstance(exc, TrainerError) else ("timeout", "fit abandoned")
                self.metrics.inc(f"trainer_errors_{kind}")
                log.warning("trainer failed: no update this round", extra={"height": height, "error": line})
                continue
            self.timing.mark("train_s", trio.current_time() - t0)
            if self.head.next_height != height:
                continue  # the chain moved on while we trained
            await self.publish(height, ann, blob, result.loss)
            del blob, result  # the update (blob + delta: 2 model copies) is on disk now; not held through the round

    async def privacy_allows(self, state: AppState) -> bool:
        """Differential privacy: train only while one more round keeps this node within its epsilon budget."""
        from flnode.node.app import privacy

        if self.genesis.rules.dp_mode == "off":
            return True
        me = self.key.public_key
        if await trio.to_thread.run_sync(privacy.may_spend_round, self.genesis, state, me):
            return True
        if not self._privacy_stopped:
            self._privacy_stopped = True
            eps = privacy.epsilon_micro(self.genesis, me, state.dp_rounds.get(me, 0)) / privacy.MICRO
            log.warning("privacy budget spent: training stopped",
                        extra={"height": state.height + 1, "epsilon_spent": eps,
                               "epsilon_budget": privacy.budget(self.genesis.rules, self.genesis.name_of(me))})
        return False

    async def publish(self, height: int, ann: UpdateAnnouncement, blob: bytes, loss: float) -> None:
        # Small updates travel inline (one message instead of n - 1 blob requests).
        out = UpdateBundle(ann, blob) if len(blob) <= UpdateBundle.INLINE_MAX else ann
        data = encode_gossip(out)
        if not self.admit(data):
            log.warning("own update not admitted", extra={"height": height})
            return
        if not await self.blobs.put(ann.blob_hash, blob, height):
            return  # the disk refused it: no update this round
        self.mempool.add_update(ann)
        log.info(
            "published update",
            extra={"height": height, "samples": ann.num_samples, "loss": round(loss, 4), "blob": short(ann.blob_hash)},
        )
        self.own_update = (height, data)
        await self.send(data, height)
