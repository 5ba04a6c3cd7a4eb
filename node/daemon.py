"""The flnode daemon: the trio driver around the pure consensus machine and the pure learning app.

Services, each with one role: the admission gate (every network message), the store worker (all SQLite work, off
the loop), the blob service (fetch and serve by hash), sync (catch up from peers), status (node/status.py). The
consensus driver is the only task that steps the machine; it reads one bounded event queue and performs the actions
in order (persist before anything leaves the process). A committed block is applied by its own task, so a missing
blob never stops timeouts, status or serving peers. Background tasks are supervised; only the consensus driver and
the store are fatal. Every deadline is on trio's clock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from flnode.consensus import (
    ProposalReceived,
    StartHeight,
    Tendermint,
    TimeoutConfig,
    TimeoutFired,
    TimeoutKind,
    ValidatorSet,
    ValueReady,
    ValueValidated,
    VoteReceived,
)
from flnode.consensus import actions as act
from flnode.node.app import (
    AppState,
    check_announcement_admission,
    genesis_state,
    make_update,
    validator_powers,
)
from flnode.node.app.blocks import build_block, check_block, missing_blobs
from flnode.node.app.fairness import unfair_reason
from flnode.node.app.membership import ever_validator, trainer_count, trains_at
from flnode.node.app.participant import (
    Participant,
    TrainerError,
    global_metrics,
    load_participant,
    trainer_record,
)
from flnode.node.app.powers import SLASH_DELAY, carries_priorities, proposer_sets, set_at
from flnode.node.app.state import state_size_cap
from flnode.node.chain.store import ChainStore
from flnode.node.config import NodeConfig, parse_direct_peer
from flnode.node.metrics import Metrics, serve_metrics
from flnode.node.net import P2PNode, peer_id_of
from flnode.node.pool import EvidencePool, UpdatePool
from flnode.protocol.crypto import NodeKey
from flnode.protocol.errors import ProtocolError, ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest, short
from flnode.protocol.membership import MembershipTx
from flnode.protocol.messages import (
    GOSSIP_MAX_SIZE,
    Block,
    CommitCertificate,
    DuplicateVoteEvidence,
    Message,
    Proposal,
    UpdateAnnouncement,
    UpdateBundle,
    Vote,
    VoteType,
    encode_gossip,
)
from flnode.protocol.tensors import BlobReader

from .admission import AdmissionGate
from .blobs import BLOB_PROTOCOL, BlobService
from .member_txs import MemberTxs
from .net import ConsensusTransport
from .net.consensus_stream import DirectConfig
from .signer import LastSignGuard, guarded
from .status import StatusFile, probe_loop_lag, status_record, write_every
from .store_worker import StoreWorker
from .supervise import supervised
from .sync import BLOCKS_PROTOCOL, STATUS_PROTOCOL, BlockSync

__all__ = ["BLOB_PROTOCOL", "BLOCKS_PROTOCOL", "STATUS_PROTOCOL", "Daemon", "Topics"]

BUNDLE_GRACE_S = 0.5  # a proposal naming a small update we lack waits this long for its bundle before fetching
P2P_DEFER_MAX_S = 20.0  # libp2p starts after the first commit, or after this long without one
log = logging.getLogger("flnode.daemon")

CUT_OFF_REASONS = {"malformed", "bad_signature", "unexpected_type", "wrong_topic"}
EVENT_QUEUE = 1024  # consensus events waiting for the driver; producers wait when it is full


def direct_config(config: NodeConfig, key: NodeKey, chain_id: str) -> DirectConfig | None:
    """The direct consensus link listens on the IP of the first TCP listen address (docs/LIBP2P.md)."""
    if config.direct_port < 0:
        return None
    for addr in config.listen:
        parts = addr.split("/")
        if len(parts) > 4 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            return DirectConfig(key, chain_id, parts[2], config.direct_port)
    return None


@dataclass(frozen=True)
class Topics:
    consensus: str
    updates: str

    @classmethod
    def for_chain(cls, chain_id: str) -> Topics:
        return cls(f"/flnode/{chain_id}/consensus/1", f"/flnode/{chain_id}/updates/1")


@dataclass(frozen=True)
class HeightApplied:
    """Internal event: the committer stored this height; the driver starts the next one."""

    height: int


def timeouts_from(genesis: Genesis) -> TimeoutConfig:
    r = genesis.rules
    return TimeoutConfig(
        propose_ms=r.timeout_propose_ms,
        propose_delta_ms=r.timeout_propose_delta_ms,
        prevote_ms=r.timeout_prevote_ms,
        prevote_delta_ms=r.timeout_prevote_delta_ms,
        precommit_ms=r.timeout_precommit_ms,
        precommit_delta_ms=r.timeout_precommit_delta_ms,
        # consensus streams are reliable while connected (a reconnect re-sends): re-send only when a round is
        # clearly stuck, after the propose timeout, not after the prevote one, and later the more validators
        # there are: a re-send relays the polka's 2f+1 prevotes to every peer (n^2 messages per node), and at 32
        # validators on 2 cores a healthy round takes about as long as the propose timeout (measured: the runs
        # with most relayed duplicates were the slowest)
        rebroadcast_ms=max(r.timeout_propose_ms, r.timeout_prevote_ms) * max(1, len(genesis.validators) // 16),
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
        sign_state_path: Path | None = None,
    ) -> None:
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.key = key
        self.me = key.public_key
        self.config = config
        self.store = store
        store.state_max_bytes = state_size_cap(genesis)
        self.status_file = StatusFile(status_path) if status_path is not None else None
        self.metrics = Metrics()
        self.topics = Topics.for_chain(genesis.chain_id)
        self._sets: dict[tuple[tuple[bytes, int], ...], ValidatorSet] = {}
        self._set_at: dict[int, tuple[AppState, ValidatorSet]] = {}
        self.is_validator = self.me in genesis.powers
        self.pool = UpdatePool()
        self.evidence = EvidencePool()

        height = store.latest_height()
        self.state: AppState = store.get_state(height) if height > 0 else genesis_state(genesis)
        self.last_block_hash: bytes = store.get_block(height).hash() if height > 0 else digest(genesis.canonical_bytes())
        self.last_cert: CommitCertificate | None = store.get_certificate(height) if height > 0 else None

        self.validators = self.validator_set(self.state.height + 1) or ValidatorSet(genesis.powers)
        self.is_validator = self.is_validator or self.validators.power(self.me) > 0  # admitted by transaction
        may_validate = self.is_validator or genesis.rules.admission != "genesis"  # ...or may be, later
        sign: Any = None
        self._sign_guard: LastSignGuard | None = None
        if may_validate:
            sign = lambda kind, payload: key.sign(self.chain_id, kind, payload)  # noqa: E731
            if sign_state_path is not None:  # the signer itself refuses a conflicting signature (store wiped or not)
                self._sign_guard = LastSignGuard(sign_state_path, deferred=True)  # written with the record below
                sign = guarded(sign, self._sign_guard)
        # A torn last record is deleted before anything is appended after it; any other unreadable one stops us.
        records = store.restorable_records(height + 1, Tendermint.check_records)
        me = self.me if may_validate else None  # the machine signs only while it has power
        timeouts = timeouts_from(genesis)
        self.machine = (
            Tendermint.restore(self.validators, me, sign, timeouts, records)
            if records
            else Tendermint(self.validators, me, sign, timeouts)
        )

        self.net = P2PNode(
            key.seed,
            list(config.listen),
            bootstrap=list(config.bootstrap),
            # Validators exchange consensus messages and their own update announcements over direct streams;
            # gossip carries only announcements from and to non-validators (trainers, observers).
            topics=[self.topics.updates],
            validator=self._validate_gossip,
            announce=list(config.announce) or None,
            max_peers=config.p2p_max_peers,
        )
        self.validator_peers = {peer_id_of(v.key_bytes): v.key_bytes for v in genesis.validators}
        self._member_peers: tuple[object, set[str]] = (None, set())  # (membership it was made of, their peer ids)
        self._peer_ids: dict[bytes, str] = {}
        # Consensus travels over direct streams between validators; a non-validator listens to every validator.
        # A stream delivers in order while it lives, so the same bytes are never sent twice on one connection
        # (a reconnect starts afresh and the machine's rebroadcast re-sends what matters).
        self.transport = ConsensusTransport(
            self.net, self.validator_peers, dial_all=not self.is_validator, resend_after=float("inf"),
            direct=direct_config(config, key, self.chain_id), is_member=self._is_member_peer,
        )
        self.transport.on_connect = self._on_validator_connected
        self.transport.directory.configure([parse_direct_peer(e) for e in config.direct_peers], self.net.peer_id)
        self._peer_of = {k: p for p, k in self.validator_peers.items()}  # validator key -> peer id
        if not self.state.membership.empty():
            self._validators_changed(self.validators)
        self._peer_height: dict[str, int] = {}
        self._peer_polka: dict[str, tuple[int, int, bytes | None]] = {}
        self._own_update: tuple[int, bytes] | None = None  # (height, encoded announcement) of our latest update
        self.worker = StoreWorker(store)
        self.blobs = BlobService(self.net, self.worker, self.metrics, max_blob_bytes=genesis.rules.max_blob_bytes)
        self.blobs.on_stored = self._on_blob_stored
        self.gate = AdmissionGate(
            self.chain_id, self.topics.consensus, self.topics.updates, self, self.metrics, trio.current_time,
            max_bytes={self.topics.consensus: GOSSIP_MAX_SIZE,
                       self.topics.updates: UpdateBundle.MAX_SIZE + 16},
        )
        # membership transactions (issue 12): mempool, and the CLI's outbox in the data dir
        self.members = MemberTxs(genesis, key, status_path.parent if status_path else None, lambda: self.state,
                                 self._send_member_tx)
        self._events_send, self._events_recv = trio.open_memory_channel[Any](EVENT_QUEUE)
        self._results: dict[bytes, tuple[AppState, Any]] = {}  # block hash -> (state, receipt), current height only
        self._validating: set[bytes] = set()
        # when each pooled update and each blob arrived (trio clock): what the fairness check calls "held since"
        self._update_seen: dict[bytes, float] = {}
        self._blob_seen: dict[bytes, float] = {}
        self._changed = trio.Event()  # set whenever the pool, blobs or height change
        self._height_started = 0.0  # trio clock
        self._started_by_commit = False  # the height started at our own commit (not at start-up)
        self._timing: dict[str, float] = {}  # phase marks of the current height, seconds since it started
        self.sync = BlockSync(self, self.net, store, self.worker, self.metrics, self._events_send.send)
        self._applying: int | None = None  # height of a committed block being applied
        self._privacy_stopped = False  # logged once: our epsilon budget allows no further round
        self.halted: str | None = None  # why consensus cannot go on (a committed block we cannot execute)
        self.collect_passes = 0  # proposer collection-loop passes, for the no-spin regression test
        self._gate_open = trio.Event()  # set once the start-up gate opened: updates sent before reach too few
        self._trace = log.isEnabledFor(logging.DEBUG)
        self._nursery: trio.Nursery | None = None
        self.data: Participant | None = None  # the node's trainer (its client), if it participates
        self.participant_index = -1
        if config.participate and self.me in genesis.powers:
            self.participant_index = genesis.index_of(self.me)
            self.data = load_participant(
                genesis, self.participant_index, str(data_file) if data_file else None, config.trainer
            )
        elif config.participate and (shard := self.members.own_shard()) is not None:  # joined: its seed's shard
            self.participant_index = shard[0]
            self.data = load_participant(genesis, shard[0], str(data_file) if data_file else None, config.trainer,
                                         shard[1])

    # ---------------------------------------------------------------- ChainView (for the admission gate)

    def next_height(self) -> int:
        return self.state.height + 1

    def consensus_round(self) -> int:
        return max(0, int(getattr(self.machine, "round", 0)))

    def validator_set(self, height: int) -> ValidatorSet | None:
        """The set in force at `height`, known up to SLASH_DELAY heights past the state (slashing is delayed)."""
        if height > self.state.height + SLASH_DELAY or height < 1:
            return None
        if height < self.state.height:
            return None  # older heights are never asked for by the live path
        cached = self._set_at.get(height)
        if cached is not None and cached[0] is self.state:
            return cached[1]  # asked for every message: computed once per (state, height)
        if carries_priorities(self.genesis):  # open membership: the stored set with its priorities
            sets = proposer_sets(self.genesis, self.state)
            key: Any = [e for e in sets if e[0] <= height][-1]
        else:
            key = tuple(sorted(validator_powers(self.genesis, self.state, height).items()))
        vs = self._sets.get(key)
        if vs is None:
            if len(self._sets) > 16:
                self._sets.clear()
            vs = self._sets[key] = set_at((key,), height) if carries_priorities(self.genesis) else ValidatorSet(dict(key))
        if len(self._set_at) > 8:
            self._set_at.clear()
        self._set_at[height] = (self.state, vs)
        return vs

    def _sync_validators(self) -> None:
        """Give the machine the set in force at the next height (before its StartHeight)."""
        vs = self.validator_set(self.state.height + 1)
        if vs is not None and vs is not self.machine.validators:
            if vs.powers != self.machine.validators.powers:
                log.warning("validator set changed", extra={"height": self.state.height + 1,
                                                            "validators": len(vs.powers)})
            self.machine.set_validators(vs)
        if vs is not None and not self.state.membership.empty():
            self._validators_changed(vs)

    def _validators_changed(self, vs: ValidatorSet) -> None:
        """Open membership: direct links follow the set (genesis validators stay peers, as when slashed, until
        they leave), and this node votes, or only listens, by its power. A validator of the next height is a
        peer one height early, so its links are up when it starts voting."""
        ended = self.state.membership.ended
        keys = [v.key_bytes for v in self.genesis.validators if ended.get(v.key_bytes, 1 << 62) > self.state.height + 1]
        following = self.validator_set(self.state.height + 2)
        keys += [*vs.powers, *(following.powers if following is not None else ())]
        peers = {peer_id_of(k): k for k in keys}
        if peers == self.validator_peers and self.is_validator == (vs.power(self.me) > 0):
            return
        self.validator_peers = peers
        self._peer_of = {k: p for p, k in self.validator_peers.items()}
        self.is_validator = vs.power(self.me) > 0
        self.transport.set_validators(self.validator_peers, dial_all=not self.is_validator)

    def membership_problem(self, tx: MembershipTx) -> str | None:
        return self.members.problem(tx)

    def announcement_problem(self, ann: UpdateAnnouncement) -> str | None:
        if ann.height == self.state.height + 1:
            reason = check_announcement_admission(self.genesis, self.state, ann)
            return None if reason is None else str(getattr(reason, "value", reason))
        if not trains_at(self.genesis, self.state, ann.author, ann.height):
            return "not_participant"
        if self.state.excluded(ann.author, self.genesis.rules.rewards.exclude_below):
            return "excluded"
        if ann.blob_size > self.genesis.rules.max_blob_bytes:
            return "oversize"
        return None

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.net.set_handler(BLOB_PROTOCOL, self.blobs.serve)
        self.sync.register()
        self._height_started = trio.current_time()
        self.sync.committed()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            deferred = self._defer_p2p()
            if deferred:
                nursery.start_soon(self._start_p2p_later)
            else:
                await nursery.start(self.net.run)
            await nursery.start(self.transport.run)
            log.info(
                "node started",
                extra={"height": self.state.height, "peer_id": self.net.peer_id,
                       "addrs": "libp2p after the first commit" if deferred else ",".join(self.net.listen_addrs())},
            )
            if self.config.metrics_listen:
                await nursery.start(serve_metrics, self.metrics, self.config.metrics_listen)
            if self.config.http_listen:  # read-only explorer, JSON API and /metrics (node/web)
                from flnode.node.web import serve_web

                await nursery.start(serve_web, self, self.config.http_listen)
            nursery.start_soon(self._consensus_loop)  # fatal: an exception here stops the node
            self._supervise("inbound", self._inbound_loop)
            self._supervise("consensus_inbound", self._consensus_inbound_loop)
            self._supervise("sync", self.sync.run)
            self._supervise("status", write_every, self._write_status)
            self._supervise("loop_lag", probe_loop_lag, self.metrics)
            self._supervise("blob_flusher", self.blobs.run_flusher)
            if self.data is not None:
                self._supervise("participant", self._participant_loop)
            self._supervise("membership", self.members.run)
            task_status.started()

    def _defer_p2p(self) -> bool:
        """A validator starting a chain from genesis whose validators' direct link addresses are configured
        needs no libp2p to link up and commit; libp2p's import and connections (~1.5 s of CPU per process) wait
        until then. Measured: 16 and 32 processes starting together on 2 cores reach their first commit that much
        sooner. A node restarting on an existing chain may need blocks from peers: it starts libp2p at once."""
        return (self.is_validator and bool(self.config.direct_peers) and self.state.height == 0
                and self.transport.direct is not None)

    async def _start_p2p_later(self) -> None:
        start = self.state.height
        with trio.move_on_after(P2P_DEFER_MAX_S):  # if consensus cannot commit alone, libp2p may be what is missing
            while self.state.height == start and not self.sync.ahead_seen:
                await self._changed.wait()
        assert self._nursery is not None
        await self._nursery.start(self.net.run)
        log.info("libp2p started", extra={"height": self.state.height, "addrs": ",".join(self.net.listen_addrs())})

    def _supervise(self, name: str, fn: Any, *args: Any, restart: bool = True) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(lambda: supervised(name, fn, *args, metrics=self.metrics, restart=restart))

    def _spawn(self, name: str, fn: Any, *args: Any) -> None:
        """A one-shot background task: a failure is logged and counted, not fatal, not restarted."""
        self._supervise(name, fn, *args, restart=False)

    def _now(self) -> float:
        return trio.current_time()

    def _mark(self, name: str, value: float | None = None) -> None:
        if name not in self._timing:
            self._timing[name] = self._now() - self._height_started if value is None else value

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def tip_changed(self) -> None:
        """Wait for the next change (the tip, the pool or the blobs): what BlockSync waits on."""
        await self._changed.wait()

    def _on_blob_stored(self, h: bytes) -> None:
        self._blob_seen.setdefault(h, self._now())
        self._check_updates_complete()
        self._notify()

    # ---------------------------------------------------------------- gossip in

    def _validate_gossip(self, topic: str, data: bytes, peer: str | None = None) -> bool:
        """libp2p topic validator: only what the admission gate admits is re-gossiped."""
        return self.gate.admit(topic, data, peer) is not None

    async def _inbound_loop(self) -> None:
        async for item in self.net.inbound:
            msg = self.gate.admit(item.topic, item.data, None)
            if msg is None:
                continue
            await self._on_message(msg, item.from_peer)

    def _note_peer_position(self, msg: Message) -> None:
        """What a validator's own signed messages prove it has seen (a light form of CometBFT's peer round
        state): the height it reached, and the polka behind its latest precommit for a block."""
        who = msg.validator if isinstance(msg, Vote) else msg.proposer if isinstance(msg, Proposal) else None
        peer = self._peer_of.get(who) if who is not None else None
        if peer is None:
            return
        assert isinstance(msg, Vote | Proposal)
        if msg.height > self._peer_height.get(peer, 0):
            self._peer_height[peer] = msg.height
        if isinstance(msg, Vote) and msg.type == VoteType.PRECOMMIT and msg.block_hash is not None:
            self._peer_polka[peer] = (msg.height, msg.round, msg.block_hash)

    def _past(self, vote: Vote) -> Any:
        """For a relayed vote, the peers that need it no more: its signer, a peer at a later height (it decided),
        and, for a prevote, a peer whose precommit for that block in that round shows it saw that polka. A peer
        merely at a later round is not skipped: it may need the polka to accept a re-proposal (L28)."""
        signer = self._peer_of.get(vote.validator)
        polka = (vote.height, vote.round, vote.block_hash) if vote.type == VoteType.PREVOTE else None

        def has_it(peer: str) -> bool:
            return (peer == signer or self._peer_height.get(peer, 0) > vote.height
                    or (polka is not None and self._peer_polka.get(peer) == polka))

        return has_it

    def _on_validator_connected(self, peer: str) -> None:
        """Bring a validator that just connected up to date: our update of this height and, through the machine's
        rebroadcast, what we signed in this round (the same bytes are sent once per connection, so only the new
        peer gets them)."""
        if self._own_update is not None and self._own_update[0] == self.state.height + 1:
            self.transport.broadcast(self._own_update[1], height=self._own_update[0], round=0)
        h, r = getattr(self.machine, "height", 0), getattr(self.machine, "round", -1)
        if h == self.state.height + 1 and r >= 0:
            try:
                self._events_send.send_nowait(TimeoutFired(TimeoutKind.REBROADCAST, h, r))
            except trio.WouldBlock:
                pass  # busy: the scheduled rebroadcast will do it

    async def _consensus_inbound_loop(self) -> None:
        async for peer, data in self.transport.inbound:
            msg = self.gate.admit(None, data, peer)
            if msg is None:
                if self.gate.last_reason in CUT_OFF_REASONS:  # a direct peer sent what no honest node sends
                    self.transport.cut_off(peer, self.gate.last_reason or "")
                continue
            await self._on_message(msg, peer)

    async def _on_message(self, msg: Message, from_peer: str | None) -> None:
        self.metrics.inc("gossip_received")
        self._note_peer_position(msg)
        self.sync.saw_height(getattr(msg, "height", 0), from_peer)
        if isinstance(msg, Vote):
            await self._events_send.send(VoteReceived(msg))
        elif isinstance(msg, Proposal):
            if msg.height == self.state.height + 1:
                self._mark("proposal_t")
            await self._events_send.send(ProposalReceived(msg))
        elif isinstance(msg, UpdateBundle):
            await self.blobs.put(msg.announcement.blob_hash, msg.blob, msg.announcement.height)
            self._on_announcement(msg.announcement, from_peer)
        elif isinstance(msg, UpdateAnnouncement):
            self._on_announcement(msg, from_peer)
        elif isinstance(msg, DuplicateVoteEvidence):
            self._pool_evidence(msg)
        elif isinstance(msg, MembershipTx) and self.members.add(msg) and self.is_validator:
            self.transport.broadcast(encode_gossip(msg), height=self.state.height + 1, round=0)  # relay once

    def _send_member_tx(self, data: bytes, height: int) -> None:
        """Our own membership transaction: to the validators directly, and on gossip for everyone else."""
        self.transport.broadcast(data, height=height, round=0)
        if self._nursery is not None:
            self._nursery.start_soon(self.net.publish, self.topics.updates, data)

    def _check_updates_complete(self) -> None:
        height = self.state.height + 1
        if "updates_t" not in self._timing and len(self._ready_authors(height)) >= trainer_count(self.genesis, self.state, height):
            self._mark("updates_t")

    def _is_member_peer(self, peer: str) -> bool:
        """A genesis validator or a current member: first claim on the consensus listener slots."""
        ms = self.state.membership
        if self._member_peers[0] is not ms:  # recomputed only when a block changed the membership
            keys = [v.key_bytes for v in self.genesis.validators] + [k for k in ms.members if k not in ms.ended]
            known = self._peer_ids
            self._peer_ids = {k: known.get(k) or peer_id_of(k) for k in keys}
            self._member_peers = (ms, set(self._peer_ids.values()))
        return peer in self._member_peers[1]

    def _pool_evidence(self, ev: DuplicateVoteEvidence) -> None:
        why = self.evidence.add(ev, self.state.punished, self.state.height)
        if why is not None and why != "duplicate":
            log.info("evidence not pooled", extra={"validator": self.genesis.name_of(ev.validator), "why": why})
            self.metrics.inc(f"evidence_dropped_{why}")

    def _on_announcement(self, ann: UpdateAnnouncement, from_peer: str | None) -> None:
        if self.pool.add(ann, self.state.height + 1):
            self._update_seen.setdefault(ann.hash(), self._now())
            log.debug("update announced", extra={"height": ann.height, "author": self.genesis.name_of(ann.author)})
            self._check_updates_complete()
            self._notify()
            if not self.blobs.holds(ann.blob_hash):
                holders = [peer_id_of(ann.author)] + ([from_peer] if from_peer else [])
                self._spawn("fetch", self._fetch_announced, ann, holders)

    def _then_connected(self, first: list[str]) -> list[str]:
        """`first` (the likeliest holders, in order), then every other connected peer, each once."""
        return list(dict.fromkeys(first + self.net.connected_peers()))

    async def _fetch_announced(self, ann: UpdateAnnouncement, holders: list[str]) -> None:
        await self.blobs.fetch_until(
            ann.blob_hash, lambda: self._then_connected(holders), ann.blob_size, give_up=lambda: self.state.height >= ann.height,
            height=ann.height,
        )

    # ---------------------------------------------------------------- consensus driver

    async def _wait_for_quorum(self) -> None:
        """The start-up gate: a validator starts its first height (after start or restart) only once it is
        connected to peers that, with itself, hold more than 2/3 of the voting power, so round 0 is not wasted."""
        if not self.is_validator:
            return
        vs = self.validator_set(self.state.height + 1) or self.validators
        powers = {peer_id_of(k): p for k, p in vs.powers.items()}
        own = powers.get(self.net.peer_id, 0)
        if not self.transport.gate_open(powers, own):
            log.info("waiting for peers holding more than 2/3 of the voting power")
            await self.transport.wait_gate(powers, own)
            log.info("start-up gate open", extra={"peers": len(self.transport.connected())})

    async def _consensus_loop(self) -> None:
        await self._wait_for_quorum()
        self._gate_open.set()
        self._height_started = self._now()
        # after a restart others may be well into the height; a new chain's first height starts for all at once
        self._started_by_commit = self.state.height == 0
        self._sync_validators()
        await self._perform(self.machine.step(StartHeight(self.state.height + 1)))
        async for event in self._events_recv:
            if isinstance(event, HeightApplied):
                if event.height == self.state.height and self._applying == event.height:
                    self._applying = None
                    self._height_started = self._now()
                    self._started_by_commit = True
                    self._timing = {}
                    self._sync_validators()
                    await self._perform(self.machine.step(StartHeight(self.state.height + 1)))
                continue
            if self._trace and not isinstance(event, VoteReceived):
                log.debug("event", extra={"what": type(event).__name__, "t": round(self._now() - self._height_started, 3),
                                          "detail": str(event)[:80]})
            await self._perform(self.machine.step(event))

    async def _persist_own(self, height: int, record: bytes) -> None:
        """The guard file and the consensus record, fsync'd at the same time on two threads (they used to block
        the event loop one after the other): an own vote waits for the slower of the two, not for their sum."""
        guard = self._sign_guard
        async with trio.open_nursery() as n:
            if guard is not None:
                n.start_soon(lambda: self.worker.run(guard.flush, limiter=self.worker.blob_limiter))
            n.start_soon(self.worker.append_record, height, record)

    async def _perform(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, act.Persist):  # the signature's guard position and record durable before it is sent
                await self._persist_own(self.state.height + 1, a.record)
            elif isinstance(a, act.Broadcast):
                self.metrics.inc("broadcast")
                m = a.message
                skip = self._past(m) if isinstance(m, Vote) and m.validator != self.me else None
                self.transport.broadcast(encode_gossip(m), height=m.height, round=m.round, skip=skip)
                if isinstance(m, Vote) and m.validator == self.me and m.height == self.state.height + 1:
                    self._mark("prevote_t" if m.type == VoteType.PREVOTE else "precommit_t")
                if self._trace:
                    log.debug("sent", extra={"what": type(m).__name__, "type": getattr(m, "type", None),
                                             "h": m.height, "r": m.round, "t": round(self._now() - self._height_started, 3)})
            elif isinstance(a, act.ScheduleTimeout):
                self._spawn("timer", self._timer, a)
            elif isinstance(a, act.GetValue):
                self._spawn("build_value", self._build_value, a.height, a.round)
            elif isinstance(a, act.ValidateValue):
                self._spawn("validate", self._validate_value, a.height, a.round, a.block)
            elif isinstance(a, act.Commit):
                if self._applying is None and a.block.height == self.state.height + 1:
                    self._mark("decided_t")
                    self._applying = a.block.height
                    assert self._nursery is not None
                    self._nursery.start_soon(self._apply_commit, a.block, a.certificate)
            elif isinstance(a, act.EmitEvidence):
                log.warning("equivocation evidence", extra={"validator": self.genesis.name_of(a.evidence.validator)})
                self.metrics.inc("evidence")
                self._pool_evidence(a.evidence)
                v = a.evidence.vote_a
                self.transport.broadcast(encode_gossip(a.evidence), height=v.height, round=v.round)

    async def _timer(self, a: Any) -> None:
        await trio.sleep(a.duration_ms / 1000)
        await self._events_send.send(TimeoutFired(a.kind, a.height, a.round))

    # ---------------------------------------------------------------- proposer

    def _ready(self, ann: UpdateAnnouncement) -> bool:
        """On the current model, and its blob held here (no I/O)."""
        return ann.base_model_hash == self.state.model_hash and self.blobs.holds(ann.blob_hash)

    def _ready_announcements(self, height: int) -> list[UpdateAnnouncement]:
        """Ready updates for `height`, in canonical order."""
        return [a for a in self.pool.for_height(height) if self._ready(a)]

    def _ready_authors(self, height: int) -> set[bytes]:
        """Authors of _ready_announcements (unordered: asked on every arrival, so no sort)."""
        return {a.author for a in self.pool.unordered(height) if self._ready(a)}

    async def _ready_updates(self, height: int) -> list[tuple[UpdateAnnouncement, BlobReader]]:
        anns = self._ready_announcements(height)
        blobs = await self.blobs.readers([a.blob_hash for a in anns])  # files, read a chunk at a time
        return [(a, blobs[a.blob_hash]) for a in anns if a.blob_hash in blobs]

    async def _build_value(self, height: int, round_: int) -> None:
        """Proposer: wait until enough updates (with blobs) are here, or the collection timeout, then build."""
        rules = self.genesis.rules
        want = rules.min_updates or trainer_count(self.genesis, self.state, height)
        deadline = self._height_started + rules.collect_timeout_ms / 1000  # trio clock, like the wait below
        while self.state.height + 1 == height and self._applying is None:
            self.collect_passes += 1
            if len(self._ready_authors(height)) >= want or self._now() >= deadline:
                break
            with trio.move_on_at(deadline):
                await self._changed.wait()
        if self.state.height + 1 != height or self._applying is not None:
            return
        state, prev, last_cert = self.state, self.last_block_hash, self.last_cert
        candidates = await self._ready_updates(height)
        evidence = self.evidence.pending()
        txs = self.members.pending()
        block, new_state, receipt = await trio.to_thread.run_sync(
            lambda: build_block(
                self.genesis, state, prev_block_hash=prev, last_commit=last_cert, proposer=self.me,
                time_ms=int(time.time() * 1000), candidates=candidates, evidence=evidence, txs=txs,
            )
        )
        if self.state is not state:
            return
        self._results[block.hash()] = (new_state, receipt)
        self._mark("proposal_t")
        log.info("proposing", extra={"height": height, "round": round_, "updates": len(block.updates)})
        await self._events_send.send(ValueReady(height, round_, block))

    # ---------------------------------------------------------------- validation (valid / invalid / not yet)

    async def _validate_value(self, height: int, round_: int, block: Block) -> None:
        """Answer valid(v) once the block's data is here. Missing data is not 'invalid': no answer is given
        until it arrives (the machine's timeouts go on meanwhile), and it is never cached as a verdict."""
        bh = block.hash()
        if bh in self._validating:
            return
        self._validating.add(bh)
        received = self._now()
        try:
            if bh not in self._results:
                if not await self._await_blobs(block, lambda: self.state.height + 1 != height):
                    return  # the height moved on
            result = await self._check_block(block)
            if self.state.height + 1 == height:
                fair = result is None or self._fair(block, received)
                await self._events_send.send(ValueValidated(height, round_, bh, result is not None, fair))
        finally:
            self._validating.discard(bh)

    def _fair(self, block: Block, received: float) -> bool:
        """A fresh proposal did not censor updates we held in time (node/app/fairness.py)."""
        if block.header.proposer == self.me or not self.is_validator:
            return True
        since = self._height_started
        held = [(a, max(since, self._update_seen.get(a.hash(), received), self._blob_seen.get(a.blob_hash, since)))
                for a in self.pool.for_height(block.height) if self._ready(a)]
        deadline = self._height_started + self.genesis.rules.collect_timeout_ms / 1000 if self._started_by_commit else None
        why = unfair_reason(self.genesis, self.state, block, held, received_at=received, deadline=deadline)
        if why is None:
            return True
        log.warning("no prevote for an unfair proposal", extra={"height": block.height, "block": short(block.hash()),
                                                                 "proposer": self.genesis.name_of(block.header.proposer),
                                                                 "why": why})
        self.metrics.inc("proposals_unfair")
        return False

    def _holders(self, block: Block, blob_hash: bytes) -> list[str]:
        first = [peer_id_of(block.header.proposer)]
        first += [peer_id_of(u.author) for u in block.updates if u.blob_hash == blob_hash]
        return self._then_connected(first)

    async def _await_blobs(self, block: Block, give_up: Any) -> bool:
        """Fetch every blob the block names (in parallel, proposer first); True once all are here."""
        unknown = missing_blobs(block, self.blobs.holds)
        if not unknown:
            return True
        inline = {u.blob_hash for u in block.updates if u.blob_size <= UpdateBundle.INLINE_MAX}.intersection(unknown)
        # Their authors' bundles are usually on the way: a fetch would race them. Not for a block peers committed
        # already (we are syncing): no bundle of its height is coming, and a wait per block would hold a syncing
        # node to the network's pace, so it never caught up.
        if inline and not self.sync.committed_elsewhere(block.height):
            with trio.move_on_after(BUNDLE_GRACE_S):
                while not all(self.blobs.holds(h) for h in inline):
                    await self._changed.wait()
        missing = [h for h in unknown if not self.blobs.holds(h) and not await self.blobs.has(h)]
        if not missing:
            return True
        size = {u.blob_hash: u.blob_size for u in block.updates}
        async with trio.open_nursery() as n:
            for h in missing:
                n.start_soon(
                    lambda h=h: self.blobs.fetch_until(
                        h, lambda: self._holders(block, h), size[h], give_up, height=block.height
                    )
                )
        return all(self.blobs.holds(h) for h in missing)

    async def _check_block(self, block: Block) -> tuple[AppState, Any] | None:
        bh = block.hash()
        if bh in self._results:
            return self._results[bh]
        state, prev = self.state, self.last_block_hash
        if block.height != state.height + 1:
            return None
        blobs = await self.blobs.readers([u.blob_hash for u in block.updates])
        t0 = self._now()
        try:
            result = await trio.to_thread.run_sync(
                lambda: check_block(self.genesis, state, block, blobs, prev_block_hash=prev)
            )
        except (ValidationError, ProtocolError) as exc:
            log.warning("refusing block", extra={"height": block.height, "block": short(bh), "why": str(exc)})
            self.metrics.inc("blocks_refused")
            return None
        if self.state is not state:
            return None
        self._results[bh] = result
        self._mark("execute_s", self._now() - t0)
        return result

    # ---------------------------------------------------------------- commit

    async def _apply_commit(self, block: Block, cert: CommitCertificate) -> None:
        """A committed block is final: fetch what it needs from anyone, execute, store; the rest of the node keeps
        running meanwhile. If it cannot be executed, the node halts consensus with a clear error, not a crash."""
        height = block.height
        attempt = 0
        while True:
            await self._await_blobs(block, lambda: False)
            result = await self._check_block(block)
            if result is not None:
                break
            attempt += 1
            self.halted = f"cannot execute committed block {height} ({short(block.hash())})"
            self.metrics.set("halted", 1)
            self.metrics.inc("commit_failures")
            log.error("cannot execute a committed block: this node's state differs from 2/3+ of the validators",
                      extra={"height": height, "block": short(block.hash()), "attempt": attempt})
            self._write_status()
            await trio.sleep(min(60.0, 2.0 * attempt))
        self.halted = None
        self.metrics.set("halted", 0)
        new_state, receipt = result
        t0 = self._now()
        def store_height() -> None:  # one trip to the store thread: a hop costs more than the work when busy
            self.store.commit_height(block, cert, new_state, receipt, new_state.model)  # streamed to its file
            self.store.prune_records(new_state.height + 1)

        await self.blobs.flush()  # the block's small update blobs are in their files before the height is stored
        await self.worker.run(store_height)
        if self.config.blob_retention_heights:
            removed: list[bytes] = []
            await self.worker.prune_blobs(new_state.height, self.config.blob_retention_heights, removed)
            self.blobs.forget(removed)
        round_time = self._now() - self._height_started
        self.sync.committed()
        self._mark("commit_t")
        timing = dict(self._timing)
        self.state, self.last_block_hash, self.last_cert = new_state, block.hash(), cert
        self.pool.prune(new_state.height + 1)
        self.evidence.committed(new_state.punished, new_state.height,
                                lambda k: ever_validator(self.genesis, new_state, k))
        self.members.committed()
        self.gate.prune(new_state.height)
        self._results.clear()
        pooled = {a.hash(): a.blob_hash for h in range(new_state.height + 1, new_state.height + 4)
                  for a in self.pool.unordered(h)}
        self._update_seen = {k: t for k, t in self._update_seen.items() if k in pooled}
        self._blob_seen = {k: t for k, t in self._blob_seen.items() if k in set(pooled.values())}
        self.metrics.set("height", new_state.height)
        self.metrics.inc("blocks_committed")
        log.info(
            "committed",
            extra={
                "height": height, "round": cert.round, "updates": len(block.updates),
                "model": short(new_state.model_hash), "round_s": round(round_time, 3),
                "store_ms": round((self._now() - t0) * 1000, 1),
            },
        )
        self._notify()
        self._spawn("record_metrics", self._record_metrics, new_state, timing, round_time, cert.round)
        self._write_status()
        await self._events_send.send(HeightApplied(height))

    async def _record_metrics(self, state: AppState, timing: dict[str, float], round_time: float, round_: int) -> None:
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
        info.update({k: round(v, 4) for k, v in timing.items()})
        await self.worker.run(self.store.put_metrics, state.height, info)
        self.metrics.set("test_accuracy", info["test_accuracy"])

    # ---------------------------------------------------------------- participant

    async def _participant_loop(self) -> None:
        await self._gate_open.wait()  # an update sent before the validators are connected reaches almost no one
        trained_for = 0
        while True:
            height = self.state.height + 1
            if height <= trained_for:
                await self._changed.wait()
                continue
            if not trains_at(self.genesis, self.state, self.me, height):  # not (yet, or any more) a trainer
                trained_for = height
                continue
            state = self.state
            assert self.data is not None
            if not await self._privacy_allows(state):  # one more round would exceed our epsilon budget
                trained_for = height
                continue
            t0 = self._now()
            # A worker thread: the loop keeps its turns while a client trains (README: measured lag); a fit
            # past the budget is abandoned here, and the client's lock fails later rounds until it returns.
            try:
                with trio.fail_after(self.genesis.task.train_budget_ms / 1000 + 5.0):
                    ann, blob, result = await trio.to_thread.run_sync(
                        make_update, self.genesis, self.key, state, self.data, self.participant_index,
                        abandon_on_cancel=True,  # type: ignore[call-arg]  # mypy: keyword after *Unpack[Ts]
                    )
            except (TrainerError, trio.TooSlowError) as exc:
                trained_for = height  # the node skips this round's update
                kind, line = (exc.kind, exc.line) if isinstance(exc, TrainerError) else ("timeout", "fit abandoned")
                self.metrics.inc(f"trainer_errors_{kind}")
                log.warning("trainer failed: no update this round", extra={"height": height, "error": line})
                continue
            trained_for = height
            self._mark("train_s", self._now() - t0)
            if self.state.height + 1 != height:
                continue  # the chain moved on while we trained
            await self._publish_update(height, ann, blob, result.loss)
            del blob, result  # the update (blob + delta: 2 model copies) is on disk now; not held through the round

    async def _privacy_allows(self, state: AppState) -> bool:
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

    async def _publish_update(self, height: int, ann: UpdateAnnouncement, blob: bytes, loss: float) -> None:
        # Small updates travel inline (one message instead of n - 1 blob requests).
        out = UpdateBundle(ann, blob) if len(blob) <= UpdateBundle.INLINE_MAX else ann
        data = encode_gossip(out)
        if self.gate.admit(self.topics.updates, data, None) is None:
            log.warning("own update not admitted", extra={"height": height})
            return
        if not await self.blobs.put(ann.blob_hash, blob, height):
            return  # the disk refused it: no update this round
        if self.pool.add(ann, height):
            self._update_seen.setdefault(ann.hash(), self._now())
        self._check_updates_complete()
        self._notify()
        log.info(
            "published update",
            extra={"height": height, "samples": ann.num_samples, "loss": round(loss, 4), "blob": short(ann.blob_hash)},
        )
        if self.is_validator:
            self._own_update = (height, data)
            self.transport.broadcast(data, height=height, round=0)
        if not self.is_validator or self.transport.subscribers() or self._gossip_peers_beyond_validators():
            await self.net.publish(self.topics.updates, data)

    def _gossip_peers_beyond_validators(self) -> bool:
        """Someone who is not a validator is connected (a trainer or observer): announcements go on gossip too."""
        return any(p not in self.validator_peers for p in self.net.connected_peers())

    # ---------------------------------------------------------------- status

    def _write_status(self) -> None:
        if self.status_file is None:
            return
        self.metrics.set("store_max_call_ms", round(self.worker.max_call_s * 1000, 2))
        self.metrics.set("sign_refusals", getattr(self.machine, "sign_refusals", 0))
        self.status_file.write(status_record(self))
