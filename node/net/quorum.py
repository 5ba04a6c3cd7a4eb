"""The start-up gate's question: can this node reach more than 2/3 of the voting power?

Starting height 1 before enough validators are connected only burns round 0 on the propose timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def has_quorum(powers: Mapping[str, int], connected: Iterable[str], self_id: str, self_power: int) -> bool:
    """True when own power plus the power of connected validators is > 2/3 of the total.

    `powers` maps validator peer ids to voting power and may include this node (its entry is replaced by
    `self_power`); connected peers that are not validators count nothing.
    """
    total = self_power + sum(p for v, p in powers.items() if v != self_id)
    have = self_power + sum(powers.get(v, 0) for v in set(connected) if v != self_id)
    return total > 0 and 3 * have > 2 * total
