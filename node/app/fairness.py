"""Honest proposals: a validator's prevote-time check that a fresh proposal did not censor updates.

Not part of block validity (execution stays deterministic and a block decided by others is still applied):
the shell answers `fair=False` with the block's verdict, and the machine then prevotes nil on it as a fresh
proposal (L22). An honest proposer builds once it holds `want` authors' updates or its collection deadline
passed, with every admissible update it holds; so a block with fewer authors than `want` that arrives well
before our own deadline, or that omits an update we held for `grace` seconds before it arrived, is not honest.
Pure: times are given by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import Block, UpdateAnnouncement

from .membership import trainer_count
from .state import AppState
from .validation import check_announcement_admission

GRACE_S = 0.5  # an update held this long before a proposal arrived must be in it (it reached every validator directly)
EARLY_SHARE = 0.5  # a short block may arrive at most this share of the collection timeout before our deadline


def wanted_authors(genesis: Genesis, state: AppState, height: int) -> int:
    """How many authors' updates an honest proposer waits for (rules.min_updates, or every trainer)."""
    return genesis.rules.min_updates or trainer_count(genesis, state, height)


def unfair_reason(
    genesis: Genesis, state: AppState, block: Block, held: Sequence[tuple[UpdateAnnouncement, float]], *,
    received_at: float, deadline: float | None, grace: float = GRACE_S,
) -> str | None:
    """Why a fresh proposal `block` (valid, for state.height + 1) is not honest, or None. `held`: the updates
    for its height this node holds (announcement and blob), each with the time it has held both since.
    `deadline`: our own collection deadline, None when we do not know when the proposer's height began."""
    listed = {u.author for u in block.updates}
    want = wanted_authors(genesis, state, block.height)
    if len(listed) >= want:
        return None
    early = None if deadline is None else deadline - EARLY_SHARE * genesis.rules.collect_timeout_ms / 1000
    if deadline is not None and early is not None and received_at < early:
        return f"{len(listed)} of {want} authors, {deadline - received_at:.2f} s before the collection deadline"
    omitted = sorted({genesis.name_of(a.author) for a, since in held
                      if a.author not in listed and since <= received_at - grace
                      and check_announcement_admission(genesis, state, a) is None})
    if omitted:
        return f"omits updates held for {grace:g} s: {', '.join(omitted[:8])}"
    return None
