"""The chain's gossip topic names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    consensus: str
    updates: str

    @classmethod
    def for_chain(cls, chain_id: str) -> Topics:
        return cls(f"/flnode/{chain_id}/consensus/1", f"/flnode/{chain_id}/updates/1")
