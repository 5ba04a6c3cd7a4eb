"""Steps, timeout kinds and the timeout schedule (base + delta x round)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

from flnode.protocol.genesis import Rules


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
    """The schedule the machine runs on. The chain's values (and these defaults) are the genesis Rules'."""

    propose_ms: int = Rules.timeout_propose_ms
    propose_delta_ms: int = Rules.timeout_propose_delta_ms
    prevote_ms: int = Rules.timeout_prevote_ms
    prevote_delta_ms: int = Rules.timeout_prevote_delta_ms
    precommit_ms: int = Rules.timeout_precommit_ms
    precommit_delta_ms: int = Rules.timeout_precommit_delta_ms
    # 0: re-send on the prevote schedule (lossy gossip). Over reliable streams a shell sets it longer: a round that
    # finishes in time then re-sends nothing, and each re-send relays 2f+1 votes to every peer.
    rebroadcast_ms: int = 0

    @classmethod
    def from_rules(cls, rules: Rules, rebroadcast_ms: int = 0) -> TimeoutConfig:
        return cls(rules.timeout_propose_ms, rules.timeout_propose_delta_ms, rules.timeout_prevote_ms,
                   rules.timeout_prevote_delta_ms, rules.timeout_precommit_ms, rules.timeout_precommit_delta_ms,
                   rebroadcast_ms)

    def duration(self, kind: TimeoutKind, round: int) -> int:
        if kind == TimeoutKind.PROPOSE:
            return self.propose_ms + self.propose_delta_ms * round
        if kind == TimeoutKind.PRECOMMIT:
            return self.precommit_ms + self.precommit_delta_ms * round
        if kind == TimeoutKind.REBROADCAST and self.rebroadcast_ms:
            return self.rebroadcast_ms + self.prevote_delta_ms * round
        return self.prevote_ms + self.prevote_delta_ms * round  # PREVOTE, and REBROADCAST by default
