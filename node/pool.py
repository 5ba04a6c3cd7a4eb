"""Update announcements waiting for a block, and evidence waiting to be included.

Announcements are kept per height so that those for the next height, from peers that committed earlier than us,
are not lost. Bounded: at most two distinct announcements per author per height (the second proves
equivocation) and a small window of heights.

Evidence is keyed by what a block punishes once, (validator, height, round, vote type): one piece per key, a few
keys per validator, and keys the chain already punished (or can no longer punish) leave at each commit, so one
equivocator's many double votes cannot crowd out another's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from flnode.node.app import evidence_key
from flnode.protocol.messages import DuplicateVoteEvidence, UpdateAnnouncement

HEIGHT_WINDOW = 3
PER_AUTHOR = 2
EVIDENCE_MAX = 64
EVIDENCE_PER_VALIDATOR = 2  # one conviction is enough to slash; a second covers a lost first
EVIDENCE_MAX_AGE = 1000  # heights: older double votes are dropped here (no block rule sets an age)

EvidenceKey = tuple[bytes, int, int, int]


@dataclass
class UpdatePool:
    by_height: dict[int, dict[bytes, list[UpdateAnnouncement]]] = field(default_factory=dict)

    def add(self, ann: UpdateAnnouncement, current_height: int) -> bool:
        """Add an announcement for a height in [current_height, current_height + WINDOW); True if new."""
        if not current_height <= ann.height < current_height + HEIGHT_WINDOW:
            return False
        authors = self.by_height.setdefault(ann.height, {})
        anns = authors.setdefault(ann.author, [])
        if any(a == ann for a in anns) or len(anns) >= PER_AUTHOR:
            return False
        anns.append(ann)
        return True

    def unordered(self, height: int) -> Iterator[UpdateAnnouncement]:
        for anns in self.by_height.get(height, {}).values():
            yield from anns

    def for_height(self, height: int) -> list[UpdateAnnouncement]:
        return sorted(self.unordered(height), key=lambda a: a.hash())

    def prune(self, below: int) -> None:
        for h in [h for h in self.by_height if h < below]:
            del self.by_height[h]



@dataclass
class EvidencePool:
    pieces: dict[EvidenceKey, DuplicateVoteEvidence] = field(default_factory=dict)

    def add(self, ev: DuplicateVoteEvidence, punished: Collection[EvidenceKey], height: int) -> str | None:
        """Pool checked evidence; None if pooled, else why not (`height` is the committed tip)."""
        key = evidence_key(ev)
        if key in self.pieces:
            return "duplicate"
        if key in punished:
            return "punished"
        if ev.vote_a.height + EVIDENCE_MAX_AGE < height:
            return "stale"
        if sum(1 for k in self.pieces if k[0] == ev.validator) >= EVIDENCE_PER_VALIDATOR:
            return "validator_cap"
        if len(self.pieces) >= EVIDENCE_MAX:
            return "pool_full"
        self.pieces[key] = ev
        return None

    def pending(self) -> list[DuplicateVoteEvidence]:
        return sorted(self.pieces.values(), key=lambda e: e.hash())

    def committed(self, punished: Collection[EvidenceKey], height: int,
                  punishable: Callable[[bytes], bool]) -> None:
        """After a block: drop what is punished now, too old, or against a key that can no longer be punished."""
        for key, ev in list(self.pieces.items()):
            if key in punished or ev.vote_a.height + EVIDENCE_MAX_AGE < height or not punishable(ev.validator):
                del self.pieces[key]
