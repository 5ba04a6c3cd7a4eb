"""The consensus driver: the only task stepping the Tendermint machine. It reads one bounded inbox of typed
events and performs the machine's actions in order; a signature's guard position and record are durable before
the message leaves the process (CometBFT's rule: fsync own votes, never sign lower)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import trio
from flnode.consensus import Event, StartHeight, Tendermint, ValidatorSet, VoteReceived
from flnode.consensus import actions as act
from flnode.node.chain.store import ChainStore
from flnode.node.metrics import Metrics
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import DuplicateVoteEvidence, Vote, VoteType, encode_gossip

from .checker import Checker
from .committer import Committer, HeightApplied
from .head import Head
from .net import ConsensusTransport
from .proposer import Proposer
from .signer import LastSignGuard, guarded
from .store_worker import StoreWorker
from .timers import Timers
from .timing import HeightTiming, consensus_timeouts

log = logging.getLogger("flnode.daemon")

EVENT_QUEUE = 1024  # events waiting for the driver; producers wait when it is full
Inbound: TypeAlias = Event | HeightApplied


def restore_machine(genesis: Genesis, key: NodeKey, store: ChainStore, height: int, validators: ValidatorSet,
                    voting: bool, sign_state_path: Path | None) -> tuple[Tendermint, LastSignGuard | None]:
    """The machine at `height`, restored from our own consensus records of it if there are any. It signs only
    while this node has power; the signer itself refuses a conflicting signature (store wiped or not)."""
    may_validate = voting or genesis.rules.admission != "genesis"  # ...or may have it, later
    sign: Any = None
    sign_guard: LastSignGuard | None = None
    if may_validate:
        chain_id = genesis.chain_id
        sign = lambda kind, payload: key.sign(chain_id, kind, payload)  # noqa: E731
        if sign_state_path is not None:
            sign_guard = LastSignGuard(sign_state_path, deferred=True)  # written with the record
            sign = guarded(sign, sign_guard)
    # A torn last record is deleted before anything is appended after it; any other unreadable one stops us.
    records = store.restorable_records(height, Tendermint.check_records)
    me = key.public_key if may_validate else None
    timeouts = consensus_timeouts(genesis)
    if records:
        return Tendermint.restore(validators, me, sign, timeouts, records), sign_guard
    return Tendermint(validators, me, sign, timeouts), sign_guard


class Driver:
    def __init__(self, genesis: Genesis, me: bytes, machine: Tendermint, head: Head, timing: HeightTiming,
                 transport: ConsensusTransport, worker: StoreWorker, sign_guard: LastSignGuard | None,
                 metrics: Metrics, *, proposer: Proposer, checker: Checker, committer: Committer,
                 already_has: Callable[[Vote], Callable[[str], bool]],
                 pool_evidence: Callable[[DuplicateVoteEvidence], None],
                 before_height: Callable[[], None], spawn: Callable[..., None]) -> None:
        self.genesis, self.me, self.machine, self.head, self.timing = genesis, me, machine, head, timing
        self.transport, self.worker, self.sign_guard, self.metrics = transport, worker, sign_guard, metrics
        self.proposer, self.checker, self.committer = proposer, checker, committer
        self.already_has = already_has  # for a relayed vote: which peers need it no more
        self.pool_evidence = pool_evidence
        self.before_height = before_height  # gives the machine the validator set of the next height
        self.spawn = spawn
        self.inbox, self.events = trio.open_memory_channel[Inbound](EVENT_QUEUE)
        self.timers = Timers(self.inbox.send)
        self.applying: int | None = None  # height of a decided block being applied
        self._nursery: trio.Nursery | None = None
        self._trace = log.isEnabledFor(logging.DEBUG)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the next height at once (the caller passed the start-up gate), then step on every event."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.timers.run)
            task_status.started()
            # after a restart others may be well into the height; a new chain's first height starts for all at once
            await self._start_height(by_commit=self.head.height == 0)
            async for event in self.events:
                if isinstance(event, HeightApplied):
                    if event.height == self.head.height and self.applying == event.height:
                        self.applying = None
                        await self._start_height(by_commit=True)
                    continue
                if self._trace and not isinstance(event, VoteReceived):
                    log.debug("event", extra={"what": type(event).__name__, "t": round(self.timing.since_start(), 3),
                                              "detail": str(event)[:80]})
                await self.perform(self.machine.step(event))
            nursery.cancel_scope.cancel()

    async def _start_height(self, by_commit: bool) -> None:
        self.timing.begin(trio.current_time(), by_commit)
        self.before_height()
        await self.perform(self.machine.step(StartHeight(self.head.next_height)))

    async def persist_own(self, height: int, record: bytes) -> None:
        """The guard file and the consensus record, fsync'd at the same time on two threads: an own vote waits for
        the slower of the two, not for their sum."""
        guard = self.sign_guard
        async with trio.open_nursery() as n:
            if guard is not None:
                n.start_soon(lambda: self.worker.run(guard.flush, limiter=self.worker.blob_limiter))
            n.start_soon(self.worker.append_record, height, record)

    async def perform(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, act.Persist):
                await self.persist_own(self.head.next_height, a.record)
            elif isinstance(a, act.Broadcast):
                self.metrics.inc("broadcast")
                m = a.message
                skip = self.already_has(m) if isinstance(m, Vote) and m.validator != self.me else None
                self.transport.broadcast(encode_gossip(m), height=m.height, round=m.round, skip=skip)
                if isinstance(m, Vote) and m.validator == self.me and m.height == self.head.next_height:
                    self.timing.mark("prevote_t" if m.type == VoteType.PREVOTE else "precommit_t")
                if self._trace:
                    log.debug("sent", extra={"what": type(m).__name__, "type": getattr(m, "type", None),
                                             "h": m.height, "r": m.round, "t": round(self.timing.since_start(), 3)})
            elif isinstance(a, act.ScheduleTimeout):
                self.timers.schedule(a)
            elif isinstance(a, act.GetValue):
                self.spawn("build_value", self.proposer.propose, a.height, a.round)
            elif isinstance(a, act.ValidateValue):
                self.spawn("validate", self.checker.validate, a.height, a.round, a.block)
            elif isinstance(a, act.Commit):
                if self.applying is None and a.block.height == self.head.next_height:
                    self.timing.mark("decided_t")
                    self.applying = a.block.height
                    assert self._nursery is not None
                    self._nursery.start_soon(self.committer.apply, a.block, a.certificate)  # fatal if it raises
            elif isinstance(a, act.EmitEvidence):
                log.warning("equivocation evidence", extra={"validator": self.genesis.name_of(a.evidence.validator)})
                self.metrics.inc("evidence")
                self.pool_evidence(a.evidence)
                v = a.evidence.vote_a
                self.transport.broadcast(encode_gossip(a.evidence), height=v.height, round=v.round)
        self.timers.retain(self.machine.height, self.machine.round)
