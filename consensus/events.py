"""Inputs of the machine (frozen values); each names the paper lines it drives."""

from __future__ import annotations

from dataclasses import dataclass

from flnode.protocol.messages import Block, CommitCertificate, Proposal, Vote

from .types import TimeoutKind


@dataclass(frozen=True)
class StartHeight:
    """L10/L54: begin height `height` at round 0 (the shell sends it after applying the previous commit)."""

    height: int


@dataclass(frozen=True)
class ProposalReceived:
    """L22, L28, L36, L49: a proposal whose signature the shell verified."""

    proposal: Proposal


@dataclass(frozen=True)
class VoteReceived:
    """L28-L55: a prevote or precommit whose signature the shell verified."""

    vote: Vote


@dataclass(frozen=True)
class ValueReady:
    """L18: getValue() answered: the block this node proposes."""

    height: int
    round: int
    block: Block


@dataclass(frozen=True)
class ValueValidated:
    """valid(v) answered by the application (after fetching and re-executing the block). `fair` is False when a
    valid block omits updates this node held in time: it gets no prevote as a fresh proposal (L22), but it stays
    valid for a proof-of-lock (L28) and a decision (L49), so a node never blocks what others committed."""

    height: int
    round: int
    block_hash: bytes
    valid: bool
    fair: bool = True


@dataclass(frozen=True)
class TimeoutFired:
    """L57 (propose), L61 (prevote), L65 (precommit)."""

    kind: TimeoutKind
    height: int
    round: int


@dataclass(frozen=True)
class CommitReceived:
    """A block with a commit certificate the shell verified against the validator set (block sync)."""

    block: Block
    certificate: CommitCertificate


Event = StartHeight | ProposalReceived | VoteReceived | ValueReady | ValueValidated | TimeoutFired | CommitReceived
