"""The validator set: voting power, quorums, and CometBFT's weighted round-robin proposer selection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


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
        self._first_height = 1  # the sequence starts at (this height, round 0)
        self._initial = dict(self._priorities)

    @classmethod
    def carried(cls, previous: ValidatorSet, powers: Mapping[bytes, int], height: int) -> ValidatorSet:
        """The set from `height` on when the powers change there, as CometBFT updates a set (open membership):
        validators that stay keep their priority as of the start of `height`, a new one starts at -1.125 times
        the new total power (so it does not propose at once), then priorities are rescaled to a window of twice
        the total power and centred on zero."""
        vs = cls(powers)
        before = previous._priorities_at(height)
        total = vs.total_power
        pr = {a: before.get(a, -(total + (total >> 3))) for a in vs.addresses}
        diff = max(pr.values()) - min(pr.values())
        if diff > 2 * total:  # RescalePriorities: Go's integer division truncates toward zero
            ratio = -(-diff // (2 * total))
            pr = {a: (p // ratio if p >= 0 else -(-p // ratio)) for a, p in pr.items()}
        avg = sum(pr.values()) // len(pr)  # shiftByAvgProposerPriority: big.Int division, floor for n > 0
        vs._priorities = {a: p - avg for a, p in pr.items()}
        vs._initial = dict(vs._priorities)
        vs._first_height = height
        return vs

    @classmethod
    def resume(cls, powers: Mapping[bytes, int], priorities: Mapping[bytes, int], first_height: int) -> ValidatorSet:
        """The set whose priorities at the start of `first_height` are `priorities` (as stored by the app at
        each change, so nothing is replayed from height 1)."""
        vs = cls(powers)
        if set(priorities) != set(vs.addresses):
            raise ValueError("priorities must name exactly the validators with power")
        vs._priorities = {a: priorities[a] for a in vs.addresses}
        vs._initial = dict(vs._priorities)
        vs._first_height = first_height
        return vs

    @property
    def first_height(self) -> int:
        return self._first_height

    def priorities_at(self, height: int) -> dict[bytes, int]:
        """Priorities at the start of `height` >= first_height."""
        if height < self._first_height:
            raise ValueError(f"this set starts at height {self._first_height}, not {height}")
        return self._priorities_at(height)

    @classmethod
    def from_schedule(cls, schedule: Sequence[tuple[int, Mapping[bytes, int]]]) -> ValidatorSet:
        """The set after a history of (first height, powers) changes, the first at height 1."""
        vs = cls(schedule[0][1])
        for height, powers in schedule[1:]:
            vs = cls.carried(vs, powers, height)
        return vs

    def _priorities_at(self, height: int) -> dict[bytes, int]:
        """Priorities at the start of `height` (after one step per earlier height), replayed on a copy."""
        pr = dict(self._initial)
        for _ in range(height - self._first_height):
            for a in self.addresses:
                pr[a] += self.powers[a]
            best = max(self.addresses, key=lambda a: (pr[a], [-b for b in a]))
            pr[best] -= self.total_power
        return pr

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
        index = (height - self._first_height) + round
        if index < 0:
            raise ValueError(f"this set starts at height {self._first_height}, not {height}")
        while len(self._sequence) <= index:
            self._advance()
        return self._sequence[index]
