"""The flnode daemon: the composition root that builds the node's services and joins them.

Services, each in its own module with one role: the head (the committed tip, node/head.py; written only by the
committer), the driver (the only task stepping the machine, node/driver.py, with node/timers.py), the proposer,
the checker (the one verdict cache), the committer, the mempool, the trainer, peers (validator links and what
each peer has seen), sync, the blob service, the store worker, the admission gate and status. This module routes
what arrives from the network to its owner and follows validator-set changes. Background tasks are supervised;
only the driver (with the committer) and the store are fatal. Every deadline is on trio's clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from flnode.consensus import (
    Tendermint,
    TimeoutConfig,
    TimeoutFired,
    TimeoutKind,
    ValidatorSet,
)
from flnode.node.app import AppState, genesis_state
from flnode.node.app.membership import trainer_count
from flnode.node.app.participant import Participant, load_participant
from flnode.node.app.state import state_size_cap
from flnode.node.chain.store import ChainStore
from flnode.node.config import NodeConfig, parse_direct_peer
from flnode.node.metrics import Metrics, serve_metrics
from flnode.node.net import P2PNode, peer_id_of
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest
from flnode.protocol.messages import (
    GOSSIP_MAX_SIZE,
    UpdateBundle,
)

from .admission import AdmissionGate
from .blobs import BLOB_PROTOCOL, BlobService
from .chain_view import NodeChainView
from .checker import Checker
from .committer import Committer
from .driver import Driver
from .head import Head
from .member_txs import MemberTxs
from .mempool import Mempool
from .net import ConsensusTransport
from .net.consensus_stream import DirectConfig
from .peers import Peers
from .proposer import Proposer
from .router import Router
from .signer import LastSignGuard, guarded
from .status import StatusFile, probe_loop_lag, status_record, write_every
from .store_worker import StoreWorker
from .supervise import supervised
from .sync import BLOCKS_PROTOCOL, STATUS_PROTOCOL, BlockSync
from .timing import HeightTiming
from .trainer import Trainer

__all__ = ["BLOB_PROTOCOL", "BLOCKS_PROTOCOL", "STATUS_PROTOCOL", "Daemon", "Topics"]

P2P_DEFER_MAX_S = 20.0  # libp2p starts after the first commit, or after this long without one
log = logging.getLogger("flnode.daemon")


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
    # the services a test node may replace with a subclass (tests/byzantine_node.py, tests/dp_forced_node.py)
    trainer_class: type[Trainer] = Trainer
    proposer_class: type[Proposer] = Proposer
    driver_class: type[Driver] = Driver
    router_class: type[Router] = Router
    # built late in __init__, read by callbacks built earlier
    router: Router
    sync: BlockSync
    driver: Driver

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

        height = store.latest_height()
        self.head = Head(
            genesis,
            store.get_state(height) if height > 0 else genesis_state(genesis),
            store.get_block(height).hash() if height > 0 else digest(genesis.canonical_bytes()),
            store.get_certificate(height) if height > 0 else None,
        )
        validators = self.head.validator_set(self.head.next_height) or ValidatorSet(genesis.powers)
        self.is_validator = self.me in genesis.powers or validators.power(self.me) > 0  # or admitted by a tx
        may_validate = self.is_validator or genesis.rules.admission != "genesis"  # ...or may be, later
        sign: Any = None
        sign_guard: LastSignGuard | None = None
        if may_validate:
            sign = lambda kind, payload: key.sign(self.chain_id, kind, payload)  # noqa: E731
            if sign_state_path is not None:  # the signer itself refuses a conflicting signature (store wiped or not)
                sign_guard = LastSignGuard(sign_state_path, deferred=True)  # written with the record below
                sign = guarded(sign, sign_guard)
        # A torn last record is deleted before anything is appended after it; any other unreadable one stops us.
        records = store.restorable_records(height + 1, Tendermint.check_records)
        me = self.me if may_validate else None  # the machine signs only while it has power
        timeouts = timeouts_from(genesis)
        self.machine = (
            Tendermint.restore(validators, me, sign, timeouts, records)
            if records
            else Tendermint(validators, me, sign, timeouts)
        )

        self.net = P2PNode(
            key.seed,
            list(config.listen),
            bootstrap=list(config.bootstrap),
            # Validators exchange consensus messages and their own update announcements over direct streams;
            # gossip carries only announcements from and to non-validators (trainers, observers).
            topics=[self.topics.updates],
            validator=lambda topic, data, peer=None: self.router.validate_gossip(topic, data, peer),
            announce=list(config.announce) or None,
            max_peers=config.p2p_max_peers,
        )
        self.peers = Peers(genesis, self.head)
        # Consensus travels over direct streams between validators; a non-validator listens to every validator.
        # A stream delivers in order while it lives, so the same bytes are never sent twice on one connection
        # (a reconnect starts afresh and the machine's rebroadcast re-sends what matters).
        self.transport = ConsensusTransport(
            self.net, self.peers.validator_peers, dial_all=not self.is_validator, resend_after=float("inf"),
            direct=direct_config(config, key, self.chain_id), is_member=self.peers.is_member_peer,
        )
        self.transport.on_connect = self._on_validator_connected
        self.transport.directory.configure([parse_direct_peer(e) for e in config.direct_peers], self.net.peer_id)
        if not self.state.membership.empty():
            self._follow_validators(validators)
        self.worker = StoreWorker(store)
        self.blobs = BlobService(self.net, self.worker, self.metrics, max_blob_bytes=genesis.rules.max_blob_bytes)
        # membership transactions: mempool, and the CLI's outbox in the data dir
        self.members = MemberTxs(genesis, key, status_path.parent if status_path else None, lambda: self.state,
                                 self._send_member_tx)
        self.view = NodeChainView(genesis, self.head, self.machine, self.members)
        self.gate = AdmissionGate(
            self.chain_id, self.topics.consensus, self.topics.updates, self.view, self.metrics, trio.current_time,
            max_bytes={self.topics.consensus: GOSSIP_MAX_SIZE,
                       self.topics.updates: UpdateBundle.MAX_SIZE + 16},
        )
        self.mempool = Mempool(genesis, self.head, self.blobs, self.members, trio.current_time)
        self.mempool.on_arrival = self._check_updates_complete
        self.blobs.on_stored = self.mempool.blob_stored
        self.timing = HeightTiming(trio.current_time)
        self.links_up = trio.Event()  # set once linked to 2/3+ of the power (the start-up gate): updates sent before reach too few
        self._nursery: trio.Nursery | None = None
        self.data: Participant | None = None  # the node's trainer (its client), if it participates
        participant_index = -1
        if config.participate and self.me in genesis.powers:
            participant_index = genesis.index_of(self.me)
            self.data = load_participant(
                genesis, participant_index, str(data_file) if data_file else None, config.trainer
            )
        elif config.participate and (shard := self.members.own_shard()) is not None:  # joined: its seed's shard
            participant_index = shard[0]
            self.data = load_participant(genesis, shard[0], str(data_file) if data_file else None, config.trainer,
                                         shard[1])

        self.checker = Checker(genesis, self.me, self.head, self.mempool, self.blobs, self.metrics, self.timing,
                               self._deliver, voting=lambda: self.is_validator,
                               committed_elsewhere=lambda h: self.sync.committed_elsewhere(h),
                               connected=self.net.connected_peers)
        self.committer = Committer(genesis, self.head, store, self.worker, self.blobs, self.checker, self.metrics,
                                   self.timing, self._deliver, blob_retention_heights=config.blob_retention_heights,
                                   data=self.data, spawn=self._spawn, on_status=self._write_status)
        self.proposer = self.proposer_class(genesis, self.me, self.head, self.mempool, self.blobs, self.checker, self.timing,
                                 self._deliver, applying=lambda: self.driver.applying is not None)
        self.driver = self.driver_class(genesis, self.me, self.machine, self.head, self.timing, self.transport, self.worker,
                             sign_guard, self.metrics, proposer=self.proposer, checker=self.checker,
                             committer=self.committer, already_has=self.peers.already_has,
                             pool_evidence=lambda ev: self.router.pool_evidence(ev), before_height=self._sync_validators,
                             spawn=self._spawn)
        self.sync = BlockSync(self.head, self.net, store, self.worker, self.metrics, self.driver.inbox.send)
        self.committer.on_committed += [self.sync.committed, self.mempool.committed,
                                        lambda: self.gate.prune(self.head.height)]
        self.router = self.router_class(genesis, self.head, self.gate, self.net, self.transport, self.peers,
                                        self.sync, self.mempool, self.blobs, self.metrics, self.timing,
                                        deliver=self._deliver, voting=lambda: self.is_validator, spawn=self._spawn)
        self.trainer = self.use_trainer(self.data, participant_index) if self.data is not None else None

    def use_trainer(self, data: Participant, index: int) -> Trainer:
        """Train as participant `index` with `data` (its client): the trainer `run` starts."""
        self.data = self.committer.data = data
        self.trainer = self.trainer_class(self.genesis, self.key, self.head, data, index, self.mempool, self.blobs,
                                          self.metrics, self.timing, admit=self._admits_own,
                                          send=self._send_own_update, links_up=self.links_up)
        return self.trainer

    # ---------------------------------------------------------------- what other parts read

    @property
    def state(self) -> AppState:
        return self.head.state

    @property
    def halted(self) -> str | None:
        return self.committer.halted

    @property
    def validator_peers(self) -> dict[str, bytes]:
        return self.peers.validator_peers

    # ---------------------------------------------------------------- validator set

    def _sync_validators(self) -> None:
        """Give the machine the set in force at the next height (before its StartHeight)."""
        vs = self.head.validator_set(self.head.next_height)
        if vs is not None and vs is not self.machine.validators:
            if vs.powers != self.machine.validators.powers:
                log.warning("validator set changed", extra={"height": self.head.next_height,
                                                            "validators": len(vs.powers)})
            self.machine.set_validators(vs)
        if vs is not None and not self.state.membership.empty():
            self._follow_validators(vs)

    def _follow_validators(self, vs: ValidatorSet) -> None:
        """Open membership: direct links follow the set (a validator of the next height is a peer one height
        early, so its links are up when it starts voting), and this node votes, or only listens, by its power."""
        changed = self.peers.follow(vs, self.head.validator_set(self.head.height + 2))
        voting = vs.power(self.me) > 0
        if changed or voting != self.is_validator:
            self.is_validator = voting
            self.transport.set_validators(self.peers.validator_peers, dial_all=not voting)

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.net.set_handler(BLOB_PROTOCOL, self.blobs.serve)
        self.sync.register()
        self.timing.begin(trio.current_time(), False)
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
            nursery.start_soon(self._consensus)  # fatal: an exception here stops the node
            self._supervise("inbound", self.router.run_gossip)
            self._supervise("consensus_inbound", self.router.run_consensus)
            self._supervise("sync", self.sync.run)
            self._supervise("status", write_every, self._write_status)
            self._supervise("loop_lag", probe_loop_lag, self.metrics)
            self._supervise("blob_flusher", self.blobs.run_flusher)
            if self.trainer is not None:
                self._supervise("participant", self.trainer.run)
            self._supervise("membership", self.members.run)
            task_status.started()

    async def _consensus(self) -> None:
        await self.wait_for_quorum()
        self.links_up.set()
        await self.driver.run()

    async def wait_for_quorum(self) -> None:
        """The start-up gate: a validator starts its first height (after start or restart) only once it is
        connected to peers that, with itself, hold more than 2/3 of the voting power, so round 0 is not wasted."""
        if not self.is_validator:
            return
        vs = self.head.validator_set(self.head.next_height) or self.machine.validators
        powers = {peer_id_of(k): p for k, p in vs.powers.items()}
        own = powers.get(self.net.peer_id, 0)
        if not self.transport.gate_open(powers, own):
            log.info("waiting for peers holding more than 2/3 of the voting power")
            await self.transport.wait_gate(powers, own)
            log.info("start-up gate open", extra={"peers": len(self.transport.connected())})

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
                with trio.move_on_after(0.5):  # ahead_seen has no wake-up of its own
                    await self.head.wait_for(start + 1)
        assert self._nursery is not None
        await self._nursery.start(self.net.run)
        log.info("libp2p started", extra={"height": self.state.height, "addrs": ",".join(self.net.listen_addrs())})

    def _supervise(self, name: str, fn: Any, *args: Any, restart: bool = True) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(lambda: supervised(name, fn, *args, metrics=self.metrics, restart=restart))

    def _spawn(self, name: str, fn: Any, *args: Any) -> None:
        """A one-shot background task: a failure is logged and counted, not fatal, not restarted."""
        self._supervise(name, fn, *args, restart=False)

    async def _deliver(self, event: Any) -> None:
        await self.driver.inbox.send(event)

    def _check_updates_complete(self) -> None:
        height = self.head.next_height
        if ("updates_t" not in self.timing.marks
                and len(self.mempool.ready_authors(height)) >= trainer_count(self.genesis, self.state, height)):
            self.timing.mark("updates_t")

    def _on_validator_connected(self, peer: str) -> None:
        """Bring a validator that just connected up to date: our update of this height and, through the machine's
        rebroadcast, what we signed in this round (the same bytes are sent once per connection, so only the new
        peer gets them)."""
        own = self.trainer.own_update if self.trainer is not None else None
        if own is not None and own[0] == self.head.next_height and self.is_validator:
            self.transport.broadcast(own[1], height=own[0], round=0)
        h, r = getattr(self.machine, "height", 0), getattr(self.machine, "round", -1)
        if h == self.head.next_height and r >= 0:
            try:
                self.driver.inbox.send_nowait(TimeoutFired(TimeoutKind.REBROADCAST, h, r))
            except trio.WouldBlock:
                pass  # busy: the scheduled rebroadcast will do it

    # ---------------------------------------------------------------- network out: our own messages

    def _admits_own(self, data: bytes) -> bool:
        return self.gate.admit(self.topics.updates, data, None) is not None

    async def _send_own_update(self, data: bytes, height: int) -> None:
        if self.is_validator:
            self.transport.broadcast(data, height=height, round=0)
        if not self.is_validator or self.transport.subscribers() or self._gossip_peers_beyond_validators():
            await self.net.publish(self.topics.updates, data)

    def _send_member_tx(self, data: bytes, height: int) -> None:
        """Our own membership transaction: to the validators directly, and on gossip for everyone else."""
        self.transport.broadcast(data, height=height, round=0)
        if self._nursery is not None:
            self._nursery.start_soon(self.net.publish, self.topics.updates, data)

    def _gossip_peers_beyond_validators(self) -> bool:
        """Someone who is not a validator is connected (a trainer or observer): announcements go on gossip too."""
        return any(p not in self.peers.validator_peers for p in self.net.connected_peers())

    # ---------------------------------------------------------------- status

    def _write_status(self) -> None:
        if self.status_file is None:
            return
        self.metrics.set("store_max_call_ms", round(self.worker.max_call_s * 1000, 2))
        self.metrics.set("sign_refusals", getattr(self.machine, "sign_refusals", 0))
        self.status_file.write(status_record(self))
