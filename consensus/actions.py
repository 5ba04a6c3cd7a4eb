"""Outputs of the machine. The shell performs them in order; a Persist must be durable before the next one."""

from __future__ import annotations

from dataclasses import dataclass

from flnode.protocol.messages import Block, CommitCertificate, DuplicateVoteEvidence, Proposal, Vote

from .types import TimeoutKind


@dataclass(frozen=True)
class GetValue:
    """L18: this node proposes and has no valid value: build a block, answer with ValueReady."""

    height: int
    round: int


@dataclass(frozen=True)
class ValidateValue:
    """Ask the application whether the block is valid; answer with ValueValidated (asked once per block)."""

    height: int
    round: int
    block: Block


@dataclass(frozen=True)
class Persist:
    """fsync this record before performing any later action of the same list (crash safety, no double-sign)."""

    record: bytes


@dataclass(frozen=True)
class Broadcast:
    """Gossip this signed message."""

    message: Proposal | Vote


@dataclass(frozen=True)
class ScheduleTimeout:
    kind: TimeoutKind
    height: int
    round: int
    duration_ms: int


@dataclass(frozen=True)
class Commit:
    """L49: decided. Execute and store the block, then send StartHeight(height + 1)."""

    height: int
    block: Block
    certificate: CommitCertificate


@dataclass(frozen=True)
class EmitEvidence:
    evidence: DuplicateVoteEvidence


Action = GetValue | ValidateValue | Persist | Broadcast | ScheduleTimeout | Commit | EmitEvidence
