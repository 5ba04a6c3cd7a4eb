"""Vote counting for one round, per type, as the paper counts: messages from distinct validators per value.

An equivocating validator's conflicting vote is evidence, and it still counts for the value it names (as in the
paper, and as CometBFT's peer-maj23 tracking allows): otherwise a node that heard the equivocator's other vote first
could never see a polka that the rest of the network saw. This is safe: two 2f+1 quorums for different values overlap
in f+1 validators, so at least one honest validator would have to equivocate. A validator counts for at most two
values per (round, type), so a Byzantine flood cannot grow memory; its votes beyond that are dropped without
creating any entry, and evidence is reported once per (validator, round, type).

Hot path: `add` keeps every total (per value, per type, any type) up to date, so the rules read them in O(1).
"""

from __future__ import annotations

from flnode.protocol.messages import CommitCertificate, Vote, VoteType

from .validators import ValidatorSet

MAX_VALUES_PER_VALIDATOR = 2


class RoundVotes:
    __slots__ = ("validators", "by_type", "by_value", "values_of", "power", "total", "voters", "voters_power",
                 "changed")

    def __init__(self, validators: ValidatorSet) -> None:
        self.validators = validators
        self.by_type: dict[int, dict[bytes, Vote]] = {1: {}, 2: {}}  # first vote of each validator
        self.by_value: dict[tuple[int, bytes | None], dict[bytes, Vote]] = {}
        self.values_of: dict[tuple[int, bytes], int] = {}  # (type, validator) -> how many values it voted for
        self.power: dict[tuple[int, bytes | None], int] = {}
        self.total: dict[int, int] = {1: 0, 2: 0}
        self.voters: set[bytes] = set()
        self.voters_power = 0  # power of the validators with any vote in this round (L55)
        self.changed = False  # whether the last add() counted the vote

    def add(self, v: Vote) -> Vote | None:
        """Count v; return an earlier conflicting vote of the same validator (equivocation), if any. Sets
        `changed` to whether anything was counted (a duplicate or an over-the-cap value changes nothing)."""
        self.changed = False
        t = int(v.type)
        key = (t, v.block_hash)
        validator = v.validator
        for_value = self.by_value.get(key)
        if for_value is not None and validator in for_value:
            return None  # a duplicate
        vkey = (t, validator)
        n_values = self.values_of.get(vkey, 0)
        if n_values >= MAX_VALUES_PER_VALIDATOR:
            return None  # already reported; a flood of further values is not counted or stored
        p = self.validators.powers.get(validator, 0)
        if for_value is None:
            for_value = self.by_value[key] = {}
        for_value[validator] = v
        self.values_of[vkey] = n_values + 1
        self.power[key] = self.power.get(key, 0) + p
        self.changed = True
        first_of_type = self.by_type[t]
        first = first_of_type.get(validator)
        if first is None:
            first_of_type[validator] = v
            self.total[t] += p
            if validator not in self.voters:
                self.voters.add(validator)
                self.voters_power += p
            return None
        return first

    def power_for(self, t: VoteType, block_hash: bytes | None) -> int:
        return self.power.get((int(t), block_hash), 0)

    def power_any(self, t: VoteType) -> int:
        return self.total[int(t)]

    def any_power(self) -> int:
        return self.voters_power

    def votes_for(self, t: VoteType, block_hash: bytes | None) -> list[Vote]:
        return list(self.by_value.get((int(t), block_hash), {}).values())

    def certificate(self, height: int, round: int, block_hash: bytes) -> CommitCertificate:
        sigs = sorted((v.validator, v.signature) for v in self.votes_for(VoteType.PRECOMMIT, block_hash))
        return CommitCertificate(height, round, block_hash, tuple(sigs))
