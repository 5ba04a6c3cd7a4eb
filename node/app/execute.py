"""Executing a block's updates: validation, aggregation, rewards and penalties. Pure and deterministic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from flnode.protocol.encoding import expect_bytes, expect_int, expect_list, expect_str, pack, unpack
from flnode.protocol.errors import DecodeError, ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest, short
from flnode.protocol.membership import MembershipTx
from flnode.protocol.messages import DuplicateVoteEvidence, UpdateAnnouncement
from flnode.protocol.tensors import BlobReader, tensors_hash

from . import privacy
from .aggregation import WeightedUpdate, aggregate, sample_weights
from .membership import apply_txs, ever_validator
from .powers import carries_priorities, next_proposer_sets, slash_height, validator_powers
from .state import AppState
from .validation import PENALISED, Reason, check_announcement, check_update_streamed


@dataclass(frozen=True)
class Receipt:
    height: int
    aggregator: str
    accepted: tuple[bytes, ...] = ()
    rejected: tuple[tuple[bytes, bytes, str], ...] = ()  # (author, announcement hash, reason)
    outliers: tuple[bytes, ...] = ()
    rewards: dict[bytes, int] = field(default_factory=dict)
    penalties: dict[bytes, int] = field(default_factory=dict)
    excluded: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        return pack([
            self.height, self.aggregator, list(self.accepted), [list(r) for r in self.rejected], list(self.outliers),
            [[k, self.rewards[k]] for k in sorted(self.rewards)],
            [[k, self.penalties[k]] for k in sorted(self.penalties)], list(self.excluded),
        ])

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        h, agg, acc, rej, outl, rew, pen, exc = expect_list(unpack(data, max_size=1 << 22), 8, "receipt")

        def keys(v: object) -> tuple[bytes, ...]:
            if not isinstance(v, list):
                raise DecodeError("receipt: bad list")
            return tuple(expect_bytes(k, "key", 32) for k in v)

        def amounts(v: object) -> dict[bytes, int]:
            if not isinstance(v, list):
                raise DecodeError("receipt: bad amounts")
            out = {}
            for item in v:
                k, n = expect_list(item, 2, "amount")
                out[expect_bytes(k, "key", 32)] = expect_int(n, "amount", 0, 1 << 62)
            return out

        if not isinstance(rej, list):
            raise DecodeError("receipt: bad rejected list")
        rejected = []
        for item in rej:
            a, ah, r = expect_list(item, 3, "rejection")
            rejected.append((expect_bytes(a, "author", 32), expect_bytes(ah, "hash", 32), expect_str(r, "reason")))
        return cls(expect_int(h, "height"), expect_str(agg, "aggregator"), keys(acc), tuple(rejected), keys(outl),
                   amounts(rew), amounts(pen), keys(exc))

    def hash(self) -> bytes:
        return digest(self.encode())


def evidence_key(ev: DuplicateVoteEvidence) -> tuple[bytes, int, int, int]:
    a = ev.vote_a
    return (a.validator, a.height, a.round, int(a.type))


def execute(
    genesis: Genesis,
    state: AppState,
    updates: Sequence[tuple[UpdateAnnouncement, bytes | BlobReader]],
    evidence: Sequence[DuplicateVoteEvidence] = (),
    txs: Sequence[MembershipTx] = (),
) -> tuple[AppState, Receipt]:
    """Apply one block. Raises ValidationError if the block lists an update it must not (the block is invalid);
    updates that are the author's fault are recorded as rejected, with a penalty. A blob may be bytes or a reader
    of its file: updates are validated and aggregated a chunk at a time, never all decoded at once."""
    rules, rw = genesis.rules, genesis.rules.rewards
    items = sorted(((ann.hash(), ann, blob) for ann, blob in updates), key=lambda t: t[0])
    seen: set[bytes] = set()
    by_author: dict[bytes, int] = {}
    for h, ann, _ in items:
        if h in seen:
            raise ValidationError(f"update {short(h)} listed twice")
        seen.add(h)
        reason = check_announcement(genesis, state, ann)
        if reason is not None:
            raise ValidationError(f"update {short(h)} from {genesis.name_of(ann.author)}: {reason}")
        by_author[ann.author] = by_author.get(ann.author, 0) + 1
    if by_author and len(by_author) < rules.min_authors:
        raise ValidationError(f"block lists updates of {len(by_author)} authors, fewer than min_authors "
                              f"{rules.min_authors}")

    rejected: list[tuple[bytes, bytes, str]] = []
    good: list[WeightedUpdate] = []
    for h, ann, blob in items:
        if by_author[ann.author] > 1:
            rejected.append((ann.author, h, str(Reason.EQUIVOCATION)))
            continue
        if privacy.refusal(genesis, state, ann.author):
            rejected.append((ann.author, h, str(Reason.PRIVACY_BUDGET_SPENT)))
            continue
        tensors, why = check_update_streamed(genesis, state, ann, blob)
        if why is not None or tensors is None:
            rejected.append((ann.author, h, str(why)))
            continue
        good.append(WeightedUpdate(h, ann.author, tensors, ann.num_samples))

    history = rules.aggregator == "centered_clip_momentum"
    result = aggregate(state.model, good, rules, seed=state.hash(), reputation=state.reputation,
                       previous=state.prev_model if history else None)
    # Rewards follow the aggregation weight (the declared count, clipped), not the bare claim.
    weight = dict(zip((u.key for u in good), sample_weights([u.num_samples for u in good],
                                                              rules.weight_median_multiple), strict=True))
    accepted = [u for u in good if u.author not in result.outliers]

    balances = dict(state.balances)
    reputation = dict(state.reputation)
    rewards: dict[bytes, int] = {}
    penalties: dict[bytes, int] = {}

    def penalise(author: bytes, amount: int) -> None:
        penalties[author] = penalties.get(author, 0) + amount
        reputation[author] = reputation.get(author, 0) - amount

    for u in accepted:
        amount = min(rw.reward_per_sample * weight[u.key], rw.reward_cap)
        rewards[u.author] = amount
        balances[u.author] = balances.get(u.author, 0) + amount
        reputation[u.author] = min(rw.max_reputation, reputation.get(u.author, 0) + rw.reputation_gain)
    penalised_equivocators = set()
    for author, _, code in rejected:
        if code == Reason.EQUIVOCATION:
            if author not in penalised_equivocators:
                penalised_equivocators.add(author)
                penalise(author, rw.penalty_equivocation)
        elif Reason(code) in PENALISED:
            penalise(author, rw.penalty_rejected)
    for u in good:
        if u.author in result.outliers:
            rejected.append((u.author, u.key, str(Reason.OUTLIER)))
            penalise(u.author, rw.penalty_outlier)
    punished = set(state.punished)
    slashed = dict(state.slashed)
    for ev in sorted(evidence, key=lambda e: e.hash()):
        ev.check(genesis.chain_id)
        if not ever_validator(genesis, state, ev.validator):
            raise ValidationError("evidence against a non-validator")
        key = evidence_key(ev)
        if key in punished:
            raise ValidationError("evidence already punished")
        punished.add(key)
        penalise(ev.validator, rw.penalty_equivocation)
        slashed.setdefault(ev.validator, slash_height(state.height + 1))  # the first conviction counts

    membership = state.membership
    if txs or not membership.empty():  # membership transactions, applied from height + 2 (node/app/membership.py)
        powers = validator_powers(genesis, state, state.height + 1)
        membership, _ = apply_txs(genesis, state, txs, powers, balances, reputation)
    excluded = tuple(sorted(k for k, r in reputation.items() if r < rw.exclude_below))
    receipt = Receipt(
        height=state.height + 1,
        aggregator=rules.aggregator,
        accepted=tuple(u.author for u in accepted),
        rejected=tuple(sorted(rejected, key=lambda r: r[1])),
        outliers=tuple(sorted(result.outliers)),
        rewards=rewards,
        penalties=penalties,
        excluded=excluded,
    )
    new_state = AppState(
        height=state.height + 1,
        model=result.new_model,
        model_hash=tensors_hash(result.new_model),
        balances=balances,
        reputation=reputation,
        last_receipt_hash=receipt.hash(),
        punished=frozenset(punished),
        slashed=slashed,
        dp_rounds=privacy.charge(genesis, state, set(by_author), rejected),
        membership=membership,
        prev_model_hash=state.model_hash if history else None,
        prev_model=state.model if history else {},
    )
    if carries_priorities(genesis):
        new_state = replace(new_state, proposers=next_proposer_sets(genesis, state, new_state))
    return new_state, receipt
