"""The validator set: voting power, quorums, and CometBFT's weighted round-robin proposer selection."""

from __future__ import annotations

from collections.abc import Mapping


class ValidatorSet:
    """Proposer of (height, round): CometBFT's ProposerPriority algorithm, replayed from height 1 round 0.

    Each step every validator's priority grows by its power, the highest priority (ties: smallest address)
    proposes and pays the total power. Results are memoised, so a lookup is O(1) after the first.
    """

    def __init__(self, powers: Mapping[bytes, int]) -> None:
        if any(p < 0 for p in powers.values()):
            raise ValueError("a validator's power cannot be negative")
        # power 0 (e.g. a slashed equivocator) is no validator: it neither votes, counts, nor proposes
        self.powers = {a: p for a, p in sorted(powers.items()) if p > 0}
        if not self.powers:
            raise ValueError("a validator set needs at least one validator with positive power")
        self.addresses = list(self.powers)
        self.total_power = sum(self.powers.values())
        self._priorities = {a: 0 for a in self.addresses}
        self._sequence: list[bytes] = []
        self._round_zero: dict[int, int] = {}  # height -> index in the sequence of (height, 0)

    def power(self, validator: bytes) -> int:
        return self.powers.get(validator, 0)

    def quorum(self) -> int:
        """The smallest power strictly above 2/3 of the total."""
        return self.total_power * 2 // 3 + 1

    def _advance(self) -> bytes:
        for a in self.addresses:
            self._priorities[a] += self.powers[a]
        best = max(self.addresses, key=lambda a: (self._priorities[a], [-b for b in a]))
        self._priorities[best] -= self.total_power
        self._sequence.append(best)
        return best

    def proposer(self, height: int, round: int) -> bytes:
        # CometBFT advances the priorities once per height (state.NextValidators) and, inside a height, r more
        # times for round r (CopyIncrementProposerPriority(r)): the proposer of (h, r) is step (h - 1) + r.
        index = (height - 1) + round
        while len(self._sequence) <= index:
            self._advance()
        return self._sequence[index]
