"""The flnode daemon: a thin trio shell around the pure consensus machine and the pure learning app.

Network messages and timer firings become consensus events; the machine's actions are performed in order
(persist before anything leaves the process, then sign/send, schedule, apply commits). Everything runs in
one nursery; cancelling it (SIGINT/SIGTERM) stops every task.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from flnode.consensus import (
    CommitReceived,
    ProposalReceived,
    StartHeight,
    Tendermint,
    TimeoutConfig,
    TimeoutFired,
    ValidatorSet,
    ValueReady,
    ValueValidated,
    VoteReceived,
)
from flnode.consensus import actions as act
from flnode.node.app import AppState, genesis_state, make_update, participant_data
from flnode.node.chain.execution import build_block, check_block, missing_blobs
from flnode.node.chain.store import ChainStore
from flnode.node.config import NodeConfig
from flnode.node.metrics import Metrics, serve_metrics
from flnode.node.net import NetError, P2PNode, peer_id_of
from flnode.node.pool import UpdatePool
from flnode.protocol.crypto import NodeKey
from flnode.protocol.errors import ProtocolError, ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest, short
from flnode.protocol.messages import (
    BlobRequest,
    Block,
    BlockRequest,
    BlockResponse,
    CommitCertificate,
    Message,
    Proposal,
    Status,
    UpdateAnnouncement,
    UpdateBundle,
    Vote,
    decode_gossip,
    encode_gossip,
)
from flnode.protocol.tensors import encode_tensors

log = logging.getLogger("flnode.daemon")

BLOB_PROTOCOL = "/flnode/blob/1.0.0"
BLOCKS_PROTOCOL = "/flnode/blocks/1.0.0"
STATUS_PROTOCOL = "/flnode/status/1.0.0"
SYNC_BATCH = 32


@dataclass(frozen=True)
class Topics:
    consensus: str
    updates: str

    @classmethod
    def for_chain(cls, chain_id: str) -> Topics:
        return cls(f"/flnode/{chain_id}/consensus/1", f"/flnode/{chain_id}/updates/1")


def timeouts_from(genesis: Genesis) -> TimeoutConfig:
    r = genesis.rules
    return TimeoutConfig(
        propose_ms=r.timeout_propose_ms,
        propose_delta_ms=r.timeout_propose_delta_ms,
        prevote_ms=r.timeout_prevote_ms,
        prevote_delta_ms=r.timeout_prevote_delta_ms,
        precommit_ms=r.timeout_precommit_ms,
        precommit_delta_ms=r.timeout_precommit_delta_ms,
    )


class Daemon:
    def __init__(
        self,
        genesis: Genesis,
        key: NodeKey,
        config: NodeConfig,
        store: ChainStore,
        *,
        status_path: Path | None = None,
        data_file: Path | None = None,
    ) -> None:
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.key = key
        self.me = key.public_key
        self.config = config
        self.store = store
        self.status_path = status_path
        self.metrics = Metrics()
        self.topics = Topics.for_chain(genesis.chain_id)
        self.validators = ValidatorSet(genesis.powers)
        self.is_validator = self.me in genesis.powers
        self.pool = UpdatePool()
        self.members = set(genesis.powers)

        height = store.latest_height()
        self.state: AppState = store.get_state(height) if height > 0 else genesis_state(genesis)
        self.last_block_hash: bytes = store.get_block(height).hash() if height > 0 else digest(genesis.canonical_bytes())
        self.last_cert: CommitCertificate | None = store.get_certificate(height) if height > 0 else None

        sign = (lambda kind, payload: key.sign(self.chain_id, kind, payload)) if self.is_validator else None
        records = store.records(height + 1)
        self.machine = Tendermint.restore(
            self.validators, self.me if self.is_validator else None, sign, timeouts_from(genesis), records
        ) if records else Tendermint(self.validators, self.me if self.is_validator else None, sign, timeouts_from(genesis))

        self.net = P2PNode(
            key.seed,
            list(config.listen),
            bootstrap=list(config.bootstrap),
            topics=[self.topics.consensus, self.topics.updates],
            validator=self._validate_gossip,
            announce=list(config.announce) or None,
        )
        self._events_send, self._events_recv = trio.open_memory_channel[Any](float("inf"))
        self._validated: OrderedDict[bytes, Message] = OrderedDict()
        self._results: dict[bytes, tuple[AppState, Any]] = {}  # block hash -> (state, receipt), current height only
        self._changed = trio.Event()  # set whenever the pool, blobs or height change
        self._fetching: dict[bytes, trio.Event] = {}
        self._height_started = time.monotonic()
        self._timing: dict[str, float] = {}  # phase marks of the current height, seconds since it started
        self._behind = trio.Event()  # set when a message shows peers at a higher height
        self._ahead_seen = False
        self._last_commit = time.monotonic()
        self._nursery: trio.Nursery | None = None
        self.data = None
        self.participant_index = -1
        if config.participate and self.me in genesis.powers:
            self.participant_index = genesis.index_of(self.me)
            self.data = participant_data(
                genesis.task, len(genesis.validators), self.participant_index, str(data_file) if data_file else None
            )

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.net.set_handler(BLOB_PROTOCOL, self._serve_blob)
        self.net.set_handler(BLOCKS_PROTOCOL, self._serve_blocks)
        self.net.set_handler(STATUS_PROTOCOL, self._serve_status)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.net.run)
            log.info(
                "node started",
                extra={"height": self.state.height, "peer_id": self.net.peer_id, "addrs": ",".join(self.net.listen_addrs())},
            )
            if self.config.metrics_listen:
                await nursery.start(serve_metrics, self.metrics, self.config.metrics_listen)
            nursery.start_soon(self._inbound_loop)
            nursery.start_soon(self._consensus_loop)
            nursery.start_soon(self._sync_loop)
            nursery.start_soon(self._status_loop)
            if self.data is not None:
                nursery.start_soon(self._participant_loop)
            task_status.started()

    def _mark(self, name: str, value: float | None = None) -> None:
        if name not in self._timing:
            self._timing[name] = time.monotonic() - self._height_started if value is None else value

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---------------------------------------------------------------- gossip in

    def _validate_gossip(self, topic: str, data: bytes) -> bool:
        """libp2p topic validator: only well-formed, signed, member, non-stale messages are re-gossiped."""
        h = digest(data)
        if h in self._validated:
            return True
        try:
            msg = decode_gossip(data)
        except ProtocolError as exc:
            self._reject("malformed", str(exc))
            return False
        reason = self._check_message(topic, msg)
        if reason is not None:
            self._reject(reason, type(msg).__name__)
            return False
        self._validated[h] = msg
        if len(self._validated) > 4096:
            self._validated.popitem(last=False)
        return True

    def _check_message(self, topic: str, msg: Message) -> str | None:
        current = self.state.height + 1
        if isinstance(msg, Vote):
            if topic != self.topics.consensus:
                return "wrong_topic"
            if msg.validator not in self.members:
                return "not_member"
            if msg.height < current - 1 or msg.height > current + 2:
                return "stale_height"
            return None if msg.verify(self.chain_id) else "bad_signature"
        if isinstance(msg, Proposal):
            if topic != self.topics.consensus:
                return "wrong_topic"
            if msg.proposer not in self.members:
                return "not_member"
            if msg.height < current or msg.height > current + 2:
                return "stale_height"
            return None if msg.verify(self.chain_id) else "bad_signature"
        if isinstance(msg, UpdateBundle):
            msg = msg.announcement
        if isinstance(msg, UpdateAnnouncement):
            if topic != self.topics.updates:
                return "wrong_topic"
            if msg.author not in self.members:
                return "not_member"
            if msg.height < current or msg.height > current + 2:
                return "stale_height"
            if msg.blob_size > self.genesis.rules.max_blob_bytes:
                return "oversize"
            return None if msg.verify(self.chain_id) else "bad_signature"
        return "unexpected_type"

    def _reject(self, reason: str, detail: str) -> None:
        self.metrics.inc(f"rejected_{reason}")
        log.info("rejected message", extra={"reason": reason, "detail": detail[:120]})

    async def _inbound_loop(self) -> None:
        async for item in self.net.inbound:
            h = digest(item.data)
            msg = self._validated.get(h)
            if msg is None:
                if not self._validate_gossip(item.topic, item.data):
                    continue
                msg = self._validated[h]
            self.metrics.inc("gossip_received")
            if getattr(msg, "height", 0) > self.state.height + 1 and not self._ahead_seen:
                self._ahead_seen = True  # someone is past our height: ask for blocks now
                self._behind.set()
            if isinstance(msg, Vote):
                await self._events_send.send(VoteReceived(msg))
            elif isinstance(msg, Proposal):
                if msg.height == self.state.height + 1:
                    self._mark("proposal_t")
                await self._events_send.send(ProposalReceived(msg))
            elif isinstance(msg, UpdateBundle):
                if not self.store.has_blob(msg.announcement.blob_hash):
                    self.store.put_blob(msg.announcement.blob_hash, msg.blob)
                self._on_announcement(msg.announcement, item.from_peer)
            elif isinstance(msg, UpdateAnnouncement):
                self._on_announcement(msg, item.from_peer)

    def _check_updates_complete(self) -> None:
        height = self.state.height + 1
        if "updates_t" not in self._timing and len({a.author for a, _ in self._ready_updates(height)}) >= len(
            self.genesis.validators
        ):
            self._mark("updates_t")

    def _on_announcement(self, ann: UpdateAnnouncement, from_peer: str | None) -> None:
        if self.pool.add(ann, self.state.height + 1):
            log.debug("update announced", extra={"height": ann.height, "author": self.genesis.name_of(ann.author)})
            self._check_updates_complete()
            self._notify()
            if not self.store.has_blob(ann.blob_hash) and self._nursery is not None:
                self._nursery.start_soon(self._fetch_blob, ann.blob_hash, ann.author, from_peer)

    # ---------------------------------------------------------------- blobs

    async def _fetch_blob(self, blob_hash: bytes, author: bytes | None, hint: str | None, attempts: int = 6) -> bool:
        """Fetch a blob by hash: from its author first, then the hinted peer, then anyone connected."""
        if self.store.has_blob(blob_hash):
            return True
        running = self._fetching.get(blob_hash)
        if running is not None:
            await running.wait()
            return self.store.has_blob(blob_hash)
        done = self._fetching[blob_hash] = trio.Event()
        try:
            for attempt in range(attempts):
                peers = []
                if author is not None and author != self.me:
                    peers.append(peer_id_of(author))
                if hint and hint not in peers and hint != self.net.peer_id:
                    peers.append(hint)
                peers += [p for p in self.net.connected_peers() if p not in peers]
                for peer in peers:
                    t0 = time.monotonic()
                    try:
                        data = await self.net.request(
                            peer,
                            BLOB_PROTOCOL,
                            BlobRequest(blob_hash).encode(),
                            max_response=self.genesis.rules.max_blob_bytes,
                            timeout=30.0,
                        )
                    except NetError as exc:
                        log.debug("blob fetch failed", extra={"peer": peer[:16], "error": str(exc)})
                        continue
                    t1 = time.monotonic()
                    if data and digest(data) == blob_hash:
                        self.store.put_blob(blob_hash, data)
                        log.debug("blob fetched", extra={"peer": peer[:16], "bytes": len(data),
                                                         "fetch_ms": round((t1 - t0) * 1000, 1),
                                                         "store_ms": round((time.monotonic() - t1) * 1000, 1)})
                        self.metrics.inc("blobs_fetched")
                        self._check_updates_complete()
                        self._notify()
                        return True
                    if data:
                        self._reject("blob_hash_mismatch", peer[:16])
                    if self.store.has_blob(blob_hash):
                        return True
                await trio.sleep(min(2.0, 0.1 * 2**attempt))
            log.warning("blob unavailable", extra={"blob": short(blob_hash)})
            return False
        finally:
            del self._fetching[blob_hash]
            done.set()

    async def _serve_blob(self, peer: str, request: bytes) -> bytes:
        req = BlobRequest.decode(request)
        return self.store.get_blob(req.blob_hash) or b""

    async def _serve_blocks(self, peer: str, request: bytes) -> bytes:
        req = BlockRequest.decode(request)
        entries = []
        top = self.store.latest_height()
        for h in range(req.from_height, min(top, req.from_height + min(req.max_blocks, SYNC_BATCH) - 1) + 1):
            block, cert = self.store.get_block(h), self.store.get_certificate(h)
            if block is None or cert is None:
                break
            entries.append((block, cert))
        return BlockResponse(tuple(entries)).encode()

    async def _serve_status(self, peer: str, request: bytes) -> bytes:
        return Status(self.state.height, self.last_block_hash, self.state.model_hash).encode()

    # ---------------------------------------------------------------- consensus

    async def _consensus_loop(self) -> None:
        self._height_started = time.monotonic()
        await self._perform(self.machine.step(StartHeight(self.state.height + 1)))
        async for event in self._events_recv:
            await self._perform(self.machine.step(event))

    async def _perform(self, actions: list[Any]) -> None:
        assert self._nursery is not None
        for a in actions:
            if isinstance(a, act.Persist):
                self.store.append_record(self.state.height + 1, a.record)
            elif isinstance(a, act.Broadcast):
                self.metrics.inc("broadcast")
                await self.net.publish(self.topics.consensus, encode_gossip(a.message))
            elif isinstance(a, act.ScheduleTimeout):
                self._nursery.start_soon(self._timer, a)
            elif isinstance(a, act.GetValue):
                self._nursery.start_soon(self._build_value, a.height, a.round)
            elif isinstance(a, act.ValidateValue):
                self._nursery.start_soon(self._validate_value, a.height, a.round, a.block)
            elif isinstance(a, act.Commit):
                await self._apply_commit(a.block, a.certificate)
                self._height_started = time.monotonic()
                self._timing = {}
                await self._perform(self.machine.step(StartHeight(self.state.height + 1)))
            elif isinstance(a, act.EmitEvidence):
                log.warning("equivocation evidence", extra={"validator": self.genesis.name_of(a.evidence.validator)})
                self.metrics.inc("evidence")
                self.pool.add_evidence(a.evidence)

    async def _timer(self, a: Any) -> None:
        await trio.sleep(a.duration_ms / 1000)
        await self._events_send.send(TimeoutFired(a.kind, a.height, a.round))

    def _ready_updates(self, height: int) -> list[tuple[UpdateAnnouncement, bytes]]:
        out = []
        for ann in self.pool.for_height(height):
            if ann.base_model_hash != self.state.model_hash:
                continue
            blob = self.store.get_blob(ann.blob_hash)
            if blob is not None:
                out.append((ann, blob))
        return out

    async def _build_value(self, height: int, round_: int) -> None:
        """Proposer: wait until enough updates (with blobs) are here, or the collection timeout, then build."""
        rules = self.genesis.rules
        want = rules.min_updates or len(self.genesis.validators)
        deadline = self._height_started + rules.collect_timeout_ms / 1000
        while self.state.height + 1 == height:
            ready = self._ready_updates(height)
            if len({a.author for a, _ in ready}) >= want or time.monotonic() >= deadline:
                break
            with trio.move_on_at(deadline):
                await self._changed.wait()
        if self.state.height + 1 != height:
            return
        state, prev, last_cert = self.state, self.last_block_hash, self.last_cert
        candidates = self._ready_updates(height)
        evidence = self.pool.pending_evidence()
        block, new_state, receipt = await trio.to_thread.run_sync(
            lambda: build_block(
                self.genesis, state, prev_block_hash=prev, last_commit=last_cert, proposer=self.me,
                time_ms=int(time.time() * 1000), candidates=candidates, evidence=evidence,
            )
        )
        self._results[block.hash()] = (new_state, receipt)
        self._mark("proposal_t")
        log.info("proposing", extra={"height": height, "round": round_, "updates": len(block.updates)})
        await self._events_send.send(ValueReady(height, round_, block))

    async def _validate_value(self, height: int, round_: int, block: Block) -> None:
        bh = block.hash()
        valid = bh in self._results
        if not valid:
            valid = await self._check_block(block) is not None
        await self._events_send.send(ValueValidated(height, round_, bh, valid))

    async def _fetch_missing(self, block: Block, attempts: int = 6) -> list[bytes]:
        missing = missing_blobs(block, self.store.has_blob)
        if missing:
            async with trio.open_nursery() as n:
                for blob_hash in missing:
                    author = next((u.author for u in block.updates if u.blob_hash == blob_hash), None)
                    n.start_soon(self._fetch_blob, blob_hash, author, peer_id_of(block.header.proposer), attempts)
        return missing_blobs(block, self.store.has_blob)

    async def _check_block(self, block: Block) -> tuple[AppState, Any] | None:
        bh = block.hash()
        if bh in self._results:
            return self._results[bh]
        await self._fetch_missing(block)
        blobs = {u.blob_hash: b for u in block.updates if (b := self.store.get_blob(u.blob_hash)) is not None}
        state, prev = self.state, self.last_block_hash
        if block.height != state.height + 1:
            return None
        t0 = time.monotonic()
        try:
            result = await trio.to_thread.run_sync(
                lambda: check_block(
                    self.genesis, state, block, blobs, prev_block_hash=prev, validator_powers=self.genesis.powers
                )
            )
        except (ValidationError, ProtocolError) as exc:
            log.warning("refusing block", extra={"height": block.height, "block": short(bh), "why": str(exc)})
            self.metrics.inc("blocks_refused")
            return None
        self._results[bh] = result
        self._mark("execute_s", time.monotonic() - t0)
        return result

    async def _apply_commit(self, block: Block, cert: CommitCertificate) -> None:
        # 2/3+ of the power committed this block, so its blobs exist: keep asking until we hold them.
        attempt = 0
        while missing := await self._fetch_missing(block, attempts=3):
            attempt += 1
            log.warning("waiting for blobs of a committed block", extra={"height": block.height, "missing": len(missing)})
            await trio.sleep(min(5.0, 0.5 * attempt))
        result = await self._check_block(block)
        if result is None:
            # A committed block we cannot execute: 2/3+ of the power signed it, so our state is the odd one out.
            raise RuntimeError(f"cannot execute committed block {block.height} ({short(block.hash())})")
        new_state, receipt = result
        t0 = time.monotonic()
        self.store.commit_height(block, cert, new_state, receipt, encode_tensors(new_state.model))
        round_time = time.monotonic() - self._height_started
        self._last_commit = time.monotonic()
        self._mark("commit_t")
        timing = dict(self._timing)
        self.state, self.last_block_hash, self.last_cert = new_state, block.hash(), cert
        self.pool.prune(new_state.height + 1)
        self.pool.mark_included(block.evidence)
        self._results.clear()
        self.store.prune_records(new_state.height + 1)
        self.metrics.set("height", new_state.height)
        self.metrics.inc("blocks_committed")
        log.info(
            "committed",
            extra={
                "height": block.height, "round": cert.round, "updates": len(block.updates),
                "model": short(new_state.model_hash), "round_s": round(round_time, 3),
                "store_ms": round((time.monotonic() - t0) * 1000, 1),
            },
        )
        self._notify()
        assert self._nursery is not None
        self._nursery.start_soon(self._record_metrics, new_state, timing, round_time, cert.round)
        self._write_status()

    async def _record_metrics(self, state: AppState, timing: dict[str, float], round_time: float, round_: int) -> None:
        """Test accuracy is for people, not for consensus: computed after the fact, stored beside the block."""
        from flnode.node.app import load_dataset, make_task

        def evaluate() -> dict[str, Any]:
            _, test = load_dataset(self.genesis.task)
            task = make_task(self.genesis.task, test.x.shape[1], test.n_classes)
            m = task.evaluate(state.model, test)
            return {"test_accuracy": float(m.accuracy), "test_loss": float(m.loss)}

        info = await trio.to_thread.run_sync(evaluate)
        info.update({"round_time_s": round(round_time, 4), "consensus_round": round_, "time": time.time()})
        info.update({k: round(v, 4) for k, v in timing.items()})
        self.store.put_metrics(state.height, info)
        self.metrics.set("test_accuracy", info["test_accuracy"])

    # ---------------------------------------------------------------- participant

    async def _participant_loop(self) -> None:
        trained_for = 0
        while True:
            height = self.state.height + 1
            if height <= trained_for:
                await self._changed.wait()
                continue
            state = self.state
            assert self.data is not None
            t0 = time.monotonic()
            ann, blob, result = await trio.to_thread.run_sync(
                make_update, self.genesis, self.key, state, self.data, self.participant_index
            )
            trained_for = height
            self._mark("train_s", time.monotonic() - t0)
            if self.state.height + 1 != height:
                continue  # the chain moved on while we trained
            self.store.put_blob(ann.blob_hash, blob)
            self.pool.add(ann, height)
            self._check_updates_complete()
            self._notify()
            log.info(
                "published update",
                extra={"height": height, "samples": ann.num_samples, "loss": round(result.loss, 4), "blob": short(ann.blob_hash)},
            )
            # Small updates travel inline (one gossip message instead of n - 1 blob requests).
            out = UpdateBundle(ann, blob) if len(blob) <= UpdateBundle.INLINE_MAX else ann
            await self.net.publish(self.topics.updates, encode_gossip(out))

    # ---------------------------------------------------------------- sync

    async def _sync_loop(self) -> None:
        """Catch up with peers that are ahead (after a restart, or when joining late).

        Asks for peers' tips when a message shows the network is ahead of us, and otherwise only when no height
        has committed for a while: status polling is not on the path of a normal round."""
        while True:
            with trio.move_on_after(2.0):
                await self._behind.wait()
            self._behind = trio.Event()
            if time.monotonic() - self._last_commit < 1.5 and not self._ahead_seen:
                continue
            self._ahead_seen = False
            for peer in self.net.connected_peers():
                try:
                    raw = await self.net.request(peer, STATUS_PROTOCOL, b"", max_response=256, timeout=5.0)
                    status = Status.decode(raw)
                except (NetError, ProtocolError):
                    continue
                if status.height > self.state.height:
                    await self._sync_from(peer, status.height)

    async def _sync_from(self, peer: str, target: int) -> None:
        while self.state.height < target:
            try:
                raw = await self.net.request(
                    peer, BLOCKS_PROTOCOL, BlockRequest(self.state.height + 1, SYNC_BATCH).encode(),
                    max_response=BlockResponse.MAX_SIZE, timeout=30.0,
                )
                resp = BlockResponse.decode(raw)
            except (NetError, ProtocolError) as exc:
                log.info("sync request failed", extra={"peer": peer[:16], "error": str(exc)})
                return
            if not resp.entries:
                return
            for block, cert in resp.entries:
                if block.height != self.state.height + 1:
                    return
                try:
                    if cert.block_hash != block.hash() or cert.height != block.height:
                        raise ValidationError("certificate is for another block")
                    cert.verify(self.chain_id, self.genesis.powers)
                except ValidationError as exc:
                    self._reject("bad_sync_block", str(exc))
                    return
                log.info("synced block", extra={"height": block.height, "from": peer[:16]})
                before = self.state.height
                await self._events_send.send(CommitReceived(block, cert))
                with trio.move_on_after(60):
                    while self.state.height == before:
                        await self._changed.wait()
                if self.state.height == before:
                    return

    # ---------------------------------------------------------------- status

    async def _status_loop(self) -> None:
        while True:
            self._write_status()
            await trio.sleep(2.0)

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        status = {
            "pid": os.getpid(),
            "time": time.time(),
            "chain_id": self.chain_id,
            "peer_id": self.net.peer_id,
            "addrs": self.net.listen_addrs(),
            "height": self.state.height,
            "consensus_height": getattr(self.machine, "height", None),
            "consensus_round": getattr(self.machine, "round", None),
            "model_hash": self.state.model_hash.hex(),
            "peers": len(self.net.connected_peers()),
            "counters": dict(self.metrics.counters),
        }
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(self.status_path)
