"""The flnode daemon: the composition root that builds the node's services (each its own module with one role,
docs/ARCHITECTURE.md draws them) and joins them. Background tasks are supervised; only the driver (with the
committer) and the store are fatal. Every deadline is on trio's clock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import trio
from flnode.consensus import ValidatorSet
from flnode.node.app import AppState
from flnode.node.app.participant import Participant
from flnode.node.app.state import state_size_cap
from flnode.node.chain.store import ChainStore
from flnode.node.config import NodeConfig
from flnode.node.metrics import Metrics
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import GOSSIP_MAX_SIZE, UpdateBundle
from flnode.protocol.topics import Topics

from .admission import AdmissionGate
from .blobs import BLOB_PROTOCOL, BlobService
from .chain_view import NodeChainView
from .checker import Checker
from .committer import Committer
from .driver import Driver, restore_machine
from .head import Head
from .member_txs import MemberTxs
from .mempool import Mempool
from .network import open_network
from .outbox import Outbox
from .peers import Peers
from .proposer import Proposer
from .router import Router
from .seat import Seat
from .startup import Startup
from .status import StatusFile, probe_loop_lag, publish_status, write_every
from .store_worker import StoreWorker
from .supervise import Tasks
from .sync import BlockSync
from .timing import HeightTiming
from .trainer import Trainer, own_participant

__all__ = ["Daemon"]

log = logging.getLogger("flnode.daemon")


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
    outbox: Outbox

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
        self.genesis, self.chain_id, self.key, self.me = genesis, genesis.chain_id, key, key.public_key
        self.config, self.store = config, store
        store.state_max_bytes = state_size_cap(genesis)
        self.status_file = StatusFile(status_path) if status_path is not None else None
        self.metrics = Metrics()
        self.tasks = Tasks(self.metrics)
        self.topics = Topics.for_chain(genesis.chain_id)

        self.head = Head.at_tip(genesis, store)
        self.timing = HeightTiming(trio.current_time)
        validators = self.head.validator_set(self.head.next_height) or ValidatorSet(genesis.powers)
        voting = self.me in genesis.powers or validators.power(self.me) > 0  # or admitted by a tx
        self.machine, sign_guard = restore_machine(genesis, key, store, self.head.next_height, validators, voting,
                                                   sign_state_path)

        self.peers = Peers(genesis, self.head)
        self.net, self.transport = open_network(
            config, key, self.chain_id, self.topics, self.peers, voting=voting,
            validate_gossip=lambda topic, data, peer: self.router.validate_gossip(topic, data, peer),
            on_connect=lambda peer: self.outbox.validator_connected(peer))
        self.seat = Seat(self.me, self.head, self.machine, self.peers, self.transport, voting)
        if not self.state.membership.empty():
            self.seat.follow(validators)
        self.worker = StoreWorker(store)
        self.blobs = BlobService(self.net, self.worker, self.metrics, max_blob_bytes=genesis.rules.max_blob_bytes)
        # membership transactions: mempool, and the CLI's outbox in the data dir
        self.members = MemberTxs(genesis, key, status_path.parent if status_path else None, lambda: self.state,
                                 lambda data, h: self.outbox.send_member_tx(data, h))
        self.view = NodeChainView(genesis, self.head, self.machine, self.members)
        self.gate = AdmissionGate(
            self.chain_id, self.topics.consensus, self.topics.updates, self.view, self.metrics, trio.current_time,
            max_bytes={self.topics.consensus: GOSSIP_MAX_SIZE, self.topics.updates: UpdateBundle.MAX_SIZE + 16},
        )
        self.outbox = Outbox(self.topics, self.head, self.net, self.transport, self.peers, self.seat, self.gate,
                             self.machine, self.tasks)
        self.mempool = Mempool(genesis, self.head, self.blobs, self.members, trio.current_time)
        self.mempool.on_arrival = lambda: self.timing.mark_once("updates_t", when=self.mempool.all_arrived)
        self.blobs.on_stored = self.mempool.blob_stored
        self.data, participant_index = own_participant(genesis, config, self.me, self.members, data_file)

        is_voting, spawn = (lambda: self.seat.voting), self.tasks.spawn
        def deliver(event: Any) -> Awaitable[None]:  # to the driver, built below
            return self.driver.inbox.send(event)

        self.checker = Checker(genesis, self.me, self.head, self.mempool, self.blobs, self.metrics, self.timing,
                               deliver, voting=is_voting, committed_elsewhere=lambda h: self.sync.committed_elsewhere(h),
                               connected=self.transport.reachable)
        self.committer = Committer(genesis, self.head, store, self.worker, self.blobs, self.checker, self.metrics,
                                   self.timing, deliver, blob_retention_heights=config.blob_retention_heights,
                                   data=self.data, spawn=spawn, on_status=self.write_status)
        self.proposer = self.proposer_class(genesis, self.me, self.head, self.mempool, self.blobs, self.checker,
                                            self.timing, deliver, applying=lambda: self.driver.applying is not None)
        self.driver = self.driver_class(genesis, self.me, self.machine, self.head, self.timing, self.transport,
                                        self.worker, sign_guard, self.metrics, proposer=self.proposer,
                                        checker=self.checker, committer=self.committer,
                                        already_has=self.peers.already_has,
                                        pool_evidence=lambda ev: self.router.pool_evidence(ev),
                                        before_height=self.seat.before_height, spawn=spawn)
        self.outbox.rebroadcast = self.driver.inbox
        self.sync = BlockSync(self.head, self.net, store, self.worker, self.metrics, self.driver.inbox.send,
                              reachable=self.transport.reachable)
        self.committer.on_committed += [self.sync.committed, self.mempool.committed,
                                        lambda: self.gate.prune(self.head.height)]
        self.router = self.router_class(genesis, self.head, self.gate, self.net, self.transport, self.peers,
                                        self.sync, self.mempool, self.blobs, self.metrics, self.timing,
                                        deliver=deliver, voting=is_voting, spawn=spawn)
        self.committer.on_committed.append(self.router.committed)
        self.startup = Startup(self.head, self.net, self.transport, self.seat, self.machine, self.sync,
                               direct_peers=bool(config.direct_peers))
        self.trainer = self.use_trainer(self.data, participant_index) if self.data is not None else None

    def use_trainer(self, data: Participant, index: int) -> Trainer:
        """Train as participant `index` with `data` (its client): the trainer `run` starts."""
        self.data = self.committer.data = data
        trainer = self.trainer_class(self.genesis, self.key, self.head, data, index, self.mempool, self.blobs,
                                     self.metrics, self.timing, admit=self.outbox.admits,
                                     send=self.outbox.send_update, links_up=self.startup.links_up)
        self.trainer = trainer
        self.outbox.own_update = lambda: trainer.own_update
        return trainer

    # ---------------------------------------------------------------- what status and the web view read

    @property
    def state(self) -> AppState:
        return self.head.state

    @property
    def halted(self) -> str | None:
        return self.committer.halted

    @property
    def validator_peers(self) -> dict[str, bytes]:
        return self.peers.validator_peers

    @property
    def is_validator(self) -> bool:
        return self.seat.voting

    @property
    def links_up(self) -> trio.Event:
        return self.startup.links_up

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.net.set_handler(BLOB_PROTOCOL, self.blobs.serve)
        self.sync.register()
        self.timing.begin(trio.current_time(), False)
        self.sync.committed()
        async with trio.open_nursery() as nursery:
            self.tasks.nursery = nursery
            deferred = self.startup.defer_p2p()
            if deferred:
                nursery.start_soon(self.startup.start_p2p_later, nursery)
            else:
                await nursery.start(self.net.run)
            await nursery.start(self.transport.run)
            log.info(
                "node started",
                extra={"height": self.state.height, "peer_id": self.net.peer_id,
                       "addrs": "libp2p after the first commit" if deferred else ",".join(self.net.listen_addrs())},
            )
            if self.config.metrics_listen or self.config.http_listen:  # imported only when served: hypercorn
                from flnode.node.web import serve_configured

                await serve_configured(nursery, self, self.config.metrics_listen, self.config.http_listen)
            nursery.start_soon(self._consensus)  # fatal: an exception here stops the node
            supervise = self.tasks.supervise
            supervise("inbound", self.router.run_gossip)
            supervise("consensus_inbound", self.router.run_consensus)
            supervise("sync", self.sync.run)
            supervise("status", write_every, self.write_status)
            supervise("loop_lag", probe_loop_lag, self.metrics)
            supervise("blob_flusher", self.blobs.run_flusher)
            if self.trainer is not None:
                supervise("participant", self.trainer.run)
            supervise("membership", self.members.run)
            task_status.started()

    async def _consensus(self) -> None:
        await self.startup.wait_for_quorum()
        await self.driver.run()

    def write_status(self) -> None:
        publish_status(self, self.worker, self.status_file)
