"""Voting power over time: the genesis powers, plus and minus membership, minus proven equivocators from
SLASH_DELAY heights after the block that carried the evidence (CometBFT applies a block's validator updates at
height h + 2); and, under open membership, the proposer priorities of each set, stored in the state."""

from __future__ import annotations

from flnode.consensus.validators import ValidatorSet
from flnode.protocol.genesis import Genesis

from .membership import member_powers
from .state import AppState, ProposerSet

SLASH_DELAY = 2


def slash_height(evidence_height: int) -> int:
    """First height at which a validator convicted by evidence in block `evidence_height` has no power."""
    return evidence_height + SLASH_DELAY


def validator_powers(genesis: Genesis, state: AppState, height: int) -> dict[bytes, int]:
    """The powers in force at `height`, zero-power validators removed. `state` is the app state after any
    height >= height - SLASH_DELAY (such a state knows every slashing in force at `height`)."""
    if state.height < height - SLASH_DELAY:
        raise ValueError(f"the state after height {state.height} cannot tell the powers at height {height}")
    return member_powers(genesis, state.membership, height, state.slashed)


def carries_priorities(genesis: Genesis) -> bool:
    """Open membership carries proposer priorities across set changes (as CometBFT); a fixed set does not."""
    return genesis.rules.admission != "genesis"


def proposer_sets(genesis: Genesis, state: AppState) -> tuple[ProposerSet, ...]:
    """The sets in force from state.height (at least 1) to state.height + SLASH_DELAY, each with its first
    height and the priorities at its start. The genesis state stores none: the genesis set from height 1."""
    if state.proposers:
        return state.proposers
    return ((1, tuple((k, p, 0) for k, p in sorted(validator_powers(genesis, state, 1).items()))),)


def _as_set(entry: ProposerSet) -> ValidatorSet:
    first, rows = entry
    return ValidatorSet.resume({k: p for k, p, _ in rows}, {k: pr for k, _, pr in rows}, first)


def set_at(sets: tuple[ProposerSet, ...], height: int) -> ValidatorSet:
    """The validator set in force at `height`, from stored sets (the last one starting at or before it)."""
    entry = [e for e in sets if e[0] <= height]
    if not entry:
        raise ValueError(f"no stored validator set covers height {height}")
    return _as_set(entry[-1])


def _entry(vs: ValidatorSet, height: int) -> ProposerSet:
    pr = vs.priorities_at(height)
    return (height, tuple((k, vs.powers[k], pr[k]) for k in vs.addresses))


def next_proposer_sets(genesis: Genesis, before: AppState, after: AppState) -> tuple[ProposerSet, ...]:
    """The stored sets after a block: the set of after.height rolled forward to start there (so a lookup
    replays at most SLASH_DELAY steps), the changes already known, and the set at after.height + SLASH_DELAY
    carried from the one before it if the powers change there."""
    sets = proposer_sets(genesis, before)
    h = after.height
    base = set_at(sets, h)
    out = [_entry(base, h), *(e for e in sets if e[0] > h)]
    last = h + SLASH_DELAY
    powers = validator_powers(genesis, after, last)
    previous = _as_set(out[-1])
    if powers != previous.powers and out[-1][0] < last:
        out.append(_entry(ValidatorSet.carried(previous, powers, last), last))
    return tuple(out)
