"""What waits for the next block: update announcements (and when each became ready here), evidence, and the
membership transactions (node/member_txs.py). Every arrival wakes `arrivals` (node/head.py Signal)."""

from __future__ import annotations

from collections.abc import Callable

from flnode.node.app.membership import ever_validator, trainer_count
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import DuplicateVoteEvidence, UpdateAnnouncement

from .blobs import BlobService
from .head import Head, Signal
from .member_txs import MemberTxs
from .pool import EvidencePool, UpdatePool


class Mempool:
    def __init__(self, genesis: Genesis, head: Head, blobs: BlobService, members: MemberTxs,
                 clock: Callable[[], float]) -> None:
        self.genesis, self.head, self.blobs, self.members, self.clock = genesis, head, blobs, members, clock
        self.updates = UpdatePool()
        self.evidence = EvidencePool()
        self.arrivals = Signal()
        self.on_arrival: Callable[[], None] = lambda: None  # after each new update or blob
        # when each pooled update and each blob arrived: what the fairness check calls "held since"
        self._update_seen: dict[bytes, float] = {}
        self._blob_seen: dict[bytes, float] = {}

    def add_update(self, ann: UpdateAnnouncement) -> bool:
        """True if new (for a height in the pool's window)."""
        if not self.updates.add(ann, self.head.next_height):
            return False
        self._update_seen.setdefault(ann.hash(), self.clock())
        self.on_arrival()
        self.arrivals.set()
        return True

    def blob_stored(self, h: bytes) -> None:
        self._blob_seen.setdefault(h, self.clock())
        self.on_arrival()
        self.arrivals.set()

    def add_evidence(self, ev: DuplicateVoteEvidence) -> str | None:
        """None if pooled, else why not ("duplicate", "punished", ...)."""
        state = self.head.state
        return self.evidence.add(ev, state.punished, state.height)

    def ready(self, ann: UpdateAnnouncement) -> bool:
        """On the current model, and its blob held here (no I/O)."""
        return ann.base_model_hash == self.head.state.model_hash and self.blobs.holds(ann.blob_hash)

    def ready_announcements(self, height: int) -> list[UpdateAnnouncement]:
        """Ready updates for `height`, in canonical order."""
        return [a for a in self.updates.for_height(height) if self.ready(a)]

    def all_arrived(self) -> bool:
        """Every trainer of the next height has its update here, announcement and blob."""
        height = self.head.next_height
        return len(self.ready_authors(height)) >= trainer_count(self.genesis, self.head.state, height)

    def ready_authors(self, height: int) -> set[bytes]:
        """Authors of ready_announcements (unordered: asked on every arrival, so no sort)."""
        return {a.author for a in self.updates.unordered(height) if self.ready(a)}

    def held(self, height: int, floor: float, default: float) -> list[tuple[UpdateAnnouncement, float]]:
        """Ready updates for `height`, each with the time since which both it and its blob are here (not before
        `floor`; `default` for an update whose arrival was not seen)."""
        return [(a, max(floor, self._update_seen.get(a.hash(), default), self._blob_seen.get(a.blob_hash, floor)))
                for a in self.updates.for_height(height) if self.ready(a)]

    def committed(self) -> None:
        """The head advanced: drop what the block settled and what no later height can use."""
        state = self.head.state
        self.updates.prune(state.height + 1)
        self.evidence.committed(state.punished, state.height, lambda k: ever_validator(self.genesis, state, k))
        self.members.committed()
        pooled = {a.hash(): a.blob_hash for h in range(state.height + 1, state.height + 4)
                  for a in self.updates.unordered(h)}
        blobs = set(pooled.values())
        self._update_seen = {k: t for k, t in self._update_seen.items() if k in pooled}
        self._blob_seen = {k: t for k, t in self._blob_seen.items() if k in blobs}
        self.arrivals.set()
