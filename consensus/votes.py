"""Vote counting for one round: power per value, per type; the first vote of a validator counts."""

from __future__ import annotations

from flnode.protocol.messages import CommitCertificate, Vote, VoteType

from .validators import ValidatorSet


class RoundVotes:
    def __init__(self, validators: ValidatorSet) -> None:
        self.validators = validators
        self.by_type: dict[int, dict[bytes, Vote]] = {1: {}, 2: {}}
        self.power: dict[tuple[int, bytes | None], int] = {}
        self.total: dict[int, int] = {1: 0, 2: 0}
        self.voters: set[bytes] = set()

    def add(self, v: Vote) -> Vote | None:
        """Count v; return the earlier conflicting vote of the same validator (equivocation), if any."""
        t = int(v.type)
        seen = self.by_type[t].get(v.validator)
        if seen is not None:
            return seen if seen.block_hash != v.block_hash else None
        p = self.validators.power(v.validator)
        self.by_type[t][v.validator] = v
        self.power[(t, v.block_hash)] = self.power.get((t, v.block_hash), 0) + p
        self.total[t] += p
        self.voters.add(v.validator)
        return None

    def power_for(self, t: VoteType, block_hash: bytes | None) -> int:
        return self.power.get((int(t), block_hash), 0)

    def power_any(self, t: VoteType) -> int:
        return self.total[int(t)]

    def any_power(self) -> int:
        return sum(self.validators.power(v) for v in self.voters)

    def certificate(self, height: int, round: int, block_hash: bytes) -> CommitCertificate:
        sigs = sorted(
            (v.validator, v.signature)
            for v in self.by_type[int(VoteType.PRECOMMIT)].values()
            if v.block_hash == block_hash
        )
        return CommitCertificate(height, round, block_hash, tuple(sigs))
