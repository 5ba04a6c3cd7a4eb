"""Tendermint BFT consensus as a pure state machine: `Tendermint.step(event) -> list[Action]`."""

from . import actions, events
from .actions import (
    Action,
    Broadcast,
    Commit,
    EmitEvidence,
    GetValue,
    Persist,
    ScheduleTimeout,
    ValidateValue,
)
from .events import (
    CommitReceived,
    Event,
    ProposalReceived,
    StartHeight,
    TimeoutFired,
    ValueReady,
    ValueValidated,
    VoteReceived,
)
from .machine import RestoreError, ShellMisuse, SignRefused, Tendermint
from .types import Step, TimeoutConfig, TimeoutKind
from .validators import ValidatorSet
from .votes import RoundVotes

__all__ = [
    "Action", "Broadcast", "Commit", "CommitReceived", "EmitEvidence", "Event", "GetValue", "Persist",
    "ProposalReceived", "RestoreError", "RoundVotes", "ScheduleTimeout", "ShellMisuse", "SignRefused", "StartHeight", "Step",
    "Tendermint", "TimeoutConfig",
    "TimeoutFired", "TimeoutKind", "ValidateValue", "ValidatorSet", "ValueReady", "ValueValidated", "VoteReceived",
    "actions", "events",
]
