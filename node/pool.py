"""Update announcements waiting for a block, and evidence waiting to be included.

Kept per height so that announcements for the next height, from peers that committed earlier than us,
are not lost. Bounded: at most two distinct announcements per author per height (the second proves
equivocation) and a small window of heights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from flnode.protocol.messages import DuplicateVoteEvidence, UpdateAnnouncement

HEIGHT_WINDOW = 3
PER_AUTHOR = 2


@dataclass
class UpdatePool:
    by_height: dict[int, dict[bytes, list[UpdateAnnouncement]]] = field(default_factory=dict)
    evidence: dict[bytes, DuplicateVoteEvidence] = field(default_factory=dict)
    included_evidence: set[bytes] = field(default_factory=set)

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

    def authors(self, height: int) -> set[bytes]:
        return set(self.by_height.get(height, {}))

    def prune(self, below: int) -> None:
        for h in [h for h in self.by_height if h < below]:
            del self.by_height[h]

    def add_evidence(self, ev: DuplicateVoteEvidence) -> None:
        h = ev.hash()
        if h not in self.included_evidence and len(self.evidence) < 64:
            self.evidence[h] = ev

    def pending_evidence(self) -> list[DuplicateVoteEvidence]:
        return [self.evidence[h] for h in sorted(self.evidence)]

    def mark_included(self, evs: tuple[DuplicateVoteEvidence, ...]) -> None:
        for ev in evs:
            h = ev.hash()
            self.included_evidence.add(h)
            self.evidence.pop(h, None)
