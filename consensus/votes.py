"""Vote counting for one round, per type, as the paper counts: messages from distinct validators per value.

An equivocating validator's conflicting vote is evidence, and it still counts for the value it names (as in the
paper, and as CometBFT's peer-maj23 tracking allows): otherwise a node that heard the equivocator's other vote first
could never see a polka that the rest of the network saw. This is safe: two 2f+1 quorums for different values overlap
in f+1 validators, so at least one honest validator would have to equivocate. A validator counts for at most two
values per (round, type), so a Byzantine flood cannot grow memory.
"""

from __future__ import annotations

from flnode.protocol.messages import CommitCertificate, Vote, VoteType

from .validators import ValidatorSet

MAX_VALUES_PER_VALIDATOR = 2


class RoundVotes:
    def __init__(self, validators: ValidatorSet) -> None:
        self.validators = validators
        self.by_type: dict[int, dict[bytes, Vote]] = {1: {}, 2: {}}  # first vote of each validator
        self.by_value: dict[tuple[int, bytes | None], dict[bytes, Vote]] = {}
        self.values_of: dict[tuple[int, bytes], int] = {}  # (type, validator) -> how many values it voted for
        self.power: dict[tuple[int, bytes | None], int] = {}
        self.total: dict[int, int] = {1: 0, 2: 0}
        self.voters: set[bytes] = set()

    def add(self, v: Vote) -> Vote | None:
        """Count v; return an earlier conflicting vote of the same validator (equivocation), if any."""
        t = int(v.type)
        key = (t, v.block_hash)
        for_value = self.by_value.setdefault(key, {})
        if v.validator in for_value:
            return None  # a duplicate
        first = self.by_type[t].get(v.validator)
        n_values = self.values_of.get((t, v.validator), 0)
        if n_values >= MAX_VALUES_PER_VALIDATOR:
            return first
        p = self.validators.power(v.validator)
        for_value[v.validator] = v
        self.values_of[(t, v.validator)] = n_values + 1
        self.power[key] = self.power.get(key, 0) + p
        if first is None:
            self.by_type[t][v.validator] = v
            self.total[t] += p
            self.voters.add(v.validator)
            return None
        return first

    def power_for(self, t: VoteType, block_hash: bytes | None) -> int:
        return self.power.get((int(t), block_hash), 0)

    def power_any(self, t: VoteType) -> int:
        return self.total[int(t)]

    def any_power(self) -> int:
        return sum(self.validators.power(v) for v in self.voters)

    def votes_for(self, t: VoteType, block_hash: bytes | None) -> list[Vote]:
        return list(self.by_value.get((int(t), block_hash), {}).values())

    def certificate(self, height: int, round: int, block_hash: bytes) -> CommitCertificate:
        sigs = sorted((v.validator, v.signature) for v in self.votes_for(VoteType.PRECOMMIT, block_hash))
        return CommitCertificate(height, round, block_hash, tuple(sigs))
