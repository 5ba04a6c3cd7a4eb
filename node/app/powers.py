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


Schedule = tuple[tuple[int, tuple[tuple[bytes, int], ...]], ...]


def validator_schedule(genesis: Genesis, state: AppState, height: int) -> Schedule:
    """Every change of the powers up to `height`, as (first height, sorted powers), the first at height 1: what
    carrying proposer priorities across set changes needs (consensus ValidatorSet.from_schedule). The state keeps
    every admission, end and slashing, so the latest state alone tells the whole history."""
    ms = state.membership
    marks = {m.since for m in ms.members.values()} | set(ms.ended.values()) | set(state.slashed.values())
    out = [(1, tuple(sorted(validator_powers(genesis, state, 1).items())))]
    for h in sorted(x for x in marks if 1 < x <= height):
        powers = tuple(sorted(validator_powers(genesis, state, h).items()))
        if powers != out[-1][1]:
            out.append((h, powers))
    return tuple(out)
