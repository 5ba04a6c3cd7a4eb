"""Steps, timeout kinds and the timeout schedule (base + delta x round)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Step(IntEnum):
    PROPOSE = 0
    PREVOTE = 1
    PRECOMMIT = 2


class TimeoutKind(StrEnum):
    PROPOSE = "propose"
    PREVOTE = "prevote"
    PRECOMMIT = "precommit"
    REBROADCAST = "rebroadcast"  # best-effort gossip: re-send own messages while a round makes no progress


@dataclass(frozen=True)
class TimeoutConfig:
    propose_ms: int = 3000
    propose_delta_ms: int = 500
    prevote_ms: int = 1000
    prevote_delta_ms: int = 500
    precommit_ms: int = 1000
    precommit_delta_ms: int = 500
    # 0: re-send on the prevote schedule (lossy gossip). Over reliable streams a shell sets it longer: a round that
    # finishes in time then re-sends nothing, and each re-send relays 2f+1 votes to every peer.
    rebroadcast_ms: int = 0

    def duration(self, kind: TimeoutKind, round: int) -> int:
        if kind == TimeoutKind.PROPOSE:
            return self.propose_ms + self.propose_delta_ms * round
        if kind == TimeoutKind.PRECOMMIT:
            return self.precommit_ms + self.precommit_delta_ms * round
        if kind == TimeoutKind.REBROADCAST and self.rebroadcast_ms:
            return self.rebroadcast_ms + self.prevote_delta_ms * round
        return self.prevote_ms + self.prevote_delta_ms * round  # PREVOTE, and REBROADCAST by default
