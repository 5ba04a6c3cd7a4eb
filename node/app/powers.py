"""Voting power over time: the genesis powers, minus proven equivocators from SLASH_DELAY heights after the
block that carried the evidence (CometBFT applies a block's validator updates at height h + 2)."""

from __future__ import annotations

from flnode.protocol.genesis import Genesis

from .membership import member_powers
from .state import AppState

SLASH_DELAY = 2


def slash_height(evidence_height: int) -> int:
    """First height at which a validator convicted by evidence in block `evidence_height` has no power."""
    return evidence_height + SLASH_DELAY


def validator_powers(genesis: Genesis, state: AppState, height: int) -> dict[bytes, int]:
    """The powers in force at `height`, zero-power validators removed. `state` is the app state after any
    height >= height - SLASH_DELAY (such a state knows every slashing in force at `height`)."""
    if state.height < height - SLASH_DELAY:
        raise ValueError(f"the state after height {state.height} cannot tell the powers at height {height}")
    members = member_powers(genesis, state.membership, height)  # genesis powers, plus and minus membership txs
    return {k: p for k, p in members.items() if state.slashed.get(k, height + 1) > height}
