"""Open membership as application state. Pure and deterministic.

The genesis validators are members from height 1 (role both). Others join by a signed `Join`. Power is never
free: under the `open` policy a trainer's join is admitted by the block that carries it, but a validator seat,
under either policy, needs admit votes from > 2/3 of the voting power; `Refuse` votes from > 1/3 drop a request.
Admitted validators hold less than `max_admitted_power_percent` of the power in force, whatever leaves or is
slashed (the latest admitted wait, powerless, while over it). A block carries at most `max_joins_per_block`
joins, and the members admitted in the last RECENT_JOIN_HEIGHTS heights declare a bounded share of the sample
weight. `Remove` needs > 2/3 of the voting power; `Leave` needs only its signer. Every change committed in block
h takes effect from height h + CHANGE_DELAY, as CometBFT applies validator updates, so the set at a height is
known two heights ahead. The state stays bounded: a member that left or was removed is pruned PRUNE_AFTER heights
after it stopped counting (its history stays on chain), and a trainer that never earned a reward in
IDLE_HEIGHTS heights is ended.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from flnode.protocol.encoding import expect_bytes, expect_int, expect_list, expect_str
from flnode.protocol.errors import DecodeError, ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import short
from flnode.protocol.membership import MAX_TXS_PER_BLOCK, TX_TTL, MembershipTx, Role, TxKind

if TYPE_CHECKING:
    from .state import AppState

CHANGE_DELAY = 2  # a change committed in block h applies from height h + 2 (= powers.SLASH_DELAY)
MAX_REQUESTS = 64  # join requests waiting for admission votes
MAX_BALLOTS = 64  # removals being voted on
RECENT_JOIN_HEIGHTS = 100  # the window of max_recent_join_weight_percent
PRUNE_AFTER = 2  # heights after it stopped counting: the last certificate it could sign is checked by then
IDLE_HEIGHTS = 200  # a trainer with no reward this long after it counts is ended (it holds a seat for nothing)


@dataclass(frozen=True)
class Member:
    """A member admitted by transaction (genesis validators are not stored: they are in the genesis)."""

    role: Role
    power: int  # voting power while it counts (0 for a trainer)
    samples: int  # declared at join: the most it may declare in an update, and so its weight bound
    moniker: str
    data_seed: int
    since: int  # first height at which it counts

    def to_list(self, key: bytes) -> list[Any]:
        return [key, int(self.role), self.power, self.samples, self.moniker, self.data_seed, self.since]


@dataclass(frozen=True)
class Ballot:
    opened: int  # height of the block that opened it; it lapses TX_TTL heights later
    votes: frozenset[bytes] = frozenset()
    against: frozenset[bytes] = frozenset()  # refuse votes (join requests only)


@dataclass(frozen=True)
class Membership:
    members: Mapping[bytes, Member] = field(default_factory=dict)
    requests: Mapping[bytes, tuple[MembershipTx, Ballot]] = field(default_factory=dict)  # joins awaiting votes
    removals: Mapping[bytes, Ballot] = field(default_factory=dict)  # target -> remove votes
    ended: Mapping[bytes, int] = field(default_factory=dict)  # member -> first height at which it no longer counts
    recent: Mapping[bytes, int] = field(default_factory=dict)  # applied tx hash -> last height it was valid in

    def empty(self) -> bool:
        return not (self.members or self.requests or self.removals or self.ended or self.recent)

    def canonical(self) -> list[Any]:
        def voters(b: Ballot) -> list[bytes]:
            return sorted(b.votes)

        return [
            [self.members[k].to_list(k) for k in sorted(self.members)],
            [[k, t.to_list(), b.opened, voters(b), *([sorted(b.against)] if b.against else [])]
             for k, (t, b) in sorted(self.requests.items())],
            [[k, b.opened, voters(b)] for k, b in sorted(self.removals.items())],
            [[k, self.ended[k]] for k in sorted(self.ended)],
            [[k, self.recent[k]] for k in sorted(self.recent)],
        ]

    @classmethod
    def from_canonical(cls, value: Any, allow_empty: bool = False) -> Membership:
        mem, req, rem, end, rec = expect_list(value, 5, "membership")
        for v in (mem, req, rem, end, rec):
            if not isinstance(v, list):
                raise DecodeError("membership: bad list")

        def keys(v: Any) -> frozenset[bytes]:
            if not isinstance(v, list):
                raise DecodeError("membership: bad voters")
            return frozenset(expect_bytes(k, "voter", 32) for k in v)

        members = {}
        for item in mem:
            k, role, power, n, moniker, seed, since = expect_list(item, 7, "member")
            members[expect_bytes(k, "member", 32)] = Member(
                Role(expect_int(role, "role", 1, 3)), expect_int(power, "power"), expect_int(n, "samples"),
                expect_str(moniker, "moniker"), expect_int(seed, "data seed"), expect_int(since, "since"))
        requests = {}
        for item in req:
            if not isinstance(item, list) or len(item) not in (4, 5):
                raise DecodeError("membership: bad request")
            k, t, opened, vs = item[:4]
            against = keys(item[4]) if len(item) == 5 else frozenset()
            if len(item) == 5 and not against:
                raise DecodeError("membership: empty refusals are not encoded")
            requests[expect_bytes(k, "requester", 32)] = (MembershipTx.from_list(t),
                                                          Ballot(expect_int(opened, "opened"), keys(vs), against))
        removals = {}
        for item in rem:
            k, opened, vs = expect_list(item, 3, "removal")
            removals[expect_bytes(k, "target", 32)] = Ballot(expect_int(opened, "opened"), keys(vs))

        def pairs(v: list[Any], what: str) -> dict[bytes, int]:
            out = {}
            for item in v:
                k, n = expect_list(item, 2, what)
                out[expect_bytes(k, what, 32)] = expect_int(n, what)
            return out

        ms = cls(members, requests, removals, pairs(end, "ended"), pairs(rec, "recent"))
        if ms.empty() and not allow_empty:
            raise DecodeError("membership: an empty membership is not encoded")
        return ms


# ---------------------------------------------------------------- who is in, at a height


def genesis_member(genesis: Genesis, key: bytes) -> bool:
    return genesis.is_validator(key)


def counts_at(genesis: Genesis, ms: Membership, key: bytes, height: int) -> bool:
    """`key` is a member in force at `height` (genesis validator, or admitted with since <= height)."""
    if ms.ended.get(key, height + 1) <= height:
        return False
    if genesis_member(genesis, key):
        return True
    m = ms.members.get(key)
    return m is not None and m.since <= height


def trains_at(genesis: Genesis, state: AppState, key: bytes, height: int) -> bool:
    """May `key` have an update in block `height`? (Trainers and both; genesis validators are both.)"""
    ms = state.membership
    if ms.empty():
        return genesis_member(genesis, key)  # the fixed set, as before open membership
    if not counts_at(genesis, ms, key, height):
        return False
    m = ms.members.get(key)
    return m is None or m.role.trains


def member_powers(genesis: Genesis, ms: Membership, height: int,
                  slashed: Mapping[bytes, int] | None = None) -> dict[bytes, int]:
    """Voting powers in force at `height`, without slashed validators (`slashed`: key -> first powerless
    height). Admitted validators count in admission order while their share stays under the genesis cap."""
    def active(k: bytes) -> bool:
        return slashed is None or slashed.get(k, height + 1) > height

    out = {k: p for k, p in genesis.powers.items() if ms.ended.get(k, height + 1) > height and active(k)}
    pct = genesis.rules.max_admitted_power_percent
    base, admitted = sum(out.values()), 0
    for k, m in sorted(ms.members.items(), key=lambda kv: (kv[1].since, kv[0])):
        if m.power > 0 and counts_at(genesis, ms, k, height) and active(k):
            if 100 * (admitted + m.power) < pct * (base + admitted + m.power):
                out[k] = m.power
                admitted += m.power
    return out


def admitted_power_ok(genesis: Genesis, ms: Membership, key: bytes, height: int) -> bool:
    """Would `key` (admitted in `ms`) hold power at `height`, under the admitted-power cap?"""
    return key in member_powers(genesis, ms, height)


def ever_validator(genesis: Genesis, state: AppState, key: bytes) -> bool:
    """Could `key` have signed consensus messages on this chain (evidence against it is meaningful)?"""
    m = state.membership.members.get(key)
    return genesis_member(genesis, key) or (m is not None and m.power > 0)


def declared_samples(state: AppState, key: bytes) -> int | None:
    m = state.membership.members.get(key)
    return None if m is None else m.samples


def name_of(genesis: Genesis, state: AppState, key: bytes) -> str:
    m = state.membership.members.get(key)
    return m.moniker if m is not None and not genesis_member(genesis, key) else genesis.name_of(key)


def seated(genesis: Genesis, ms: Membership) -> int:
    """Members holding a seat under max_members: everyone admitted who has not left (or been removed)."""
    return sum(1 for k in genesis.powers if k not in ms.ended) + sum(1 for k in ms.members if k not in ms.ended)


# ---------------------------------------------------------------- transactions


class Refusal(ValidationError):
    """A transaction that must not be in the block; `reason` is a short code."""

    def __init__(self, reason: str, tx: MembershipTx) -> None:
        super().__init__(f"membership tx {short(tx.hash())} ({tx.kind.name.lower()}): {reason}")
        self.reason = reason


@dataclass
class _Apply:
    """One block's membership changes, applied tx by tx on copies of the maps."""

    genesis: Genesis
    height: int  # the block being executed
    powers: dict[bytes, int]  # voting powers in force at this block: who may vote, and how much
    members: dict[bytes, Member]
    requests: dict[bytes, tuple[MembershipTx, Ballot]]
    removals: dict[bytes, Ballot]
    ended: dict[bytes, int]
    recent: dict[bytes, int]
    balances: dict[bytes, int]
    reputation: dict[bytes, int]
    joins: int = 0  # join transactions applied so far in this block

    def known(self, key: bytes) -> bool:
        return genesis_member(self.genesis, key) or key in self.members or key in self.ended

    def current(self, key: bytes) -> bool:
        """Admitted (perhaps not yet in force) and not leaving."""
        return (genesis_member(self.genesis, key) or key in self.members) and key not in self.ended

    def seats(self) -> int:
        return seated(self.genesis, Membership(self.members, ended=self.ended))

    def quorum(self, votes: Iterable[bytes]) -> bool:
        total = sum(self.powers.values())
        return 3 * sum(self.powers.get(v, 0) for v in votes) > 2 * total

    def power_left_without(self, key: bytes) -> int:
        """Voting power that remains in force once `key` and everyone leaving are gone."""
        later = self.height + CHANGE_DELAY
        ms = Membership(self.members, ended={**self.ended, key: later})
        return sum(member_powers(self.genesis, ms, later).values())

    def admit(self, tx: MembershipTx) -> None:
        r = self.genesis.rules
        self.requests.pop(tx.signer, None)
        role = Role(tx.role)
        self.members[tx.signer] = Member(role, r.member_power if role.validates else 0, tx.samples, tx.moniker,
                                         tx.data_seed, self.height + CHANGE_DELAY)
        self.balances.setdefault(tx.signer, 0)
        self.reputation.setdefault(tx.signer, r.rewards.initial_reputation)

    def power_cap_allows(self, tx: MembershipTx) -> bool:
        """A validator seat fits under the admitted-power cap at the height it would count from."""
        if not Role(tx.role).validates:
            return True
        later = self.height + CHANGE_DELAY
        trial = dict(self.members)
        trial[tx.signer] = Member(Role(tx.role), self.genesis.rules.member_power, tx.samples, tx.moniker,
                                  tx.data_seed, later)
        return admitted_power_ok(self.genesis, Membership(trial, ended=self.ended), tx.signer, later)

    def recent_weight_allows(self, tx: MembershipTx) -> bool:
        """Trainers admitted recently (or asking) declare at most the genesis share of the sample weight."""
        if not Role(tx.role).trains:
            return True
        r = self.genesis.rules
        budget = r.max_recent_join_weight_percent * len(self.genesis.validators) * r.max_samples_per_update
        recent = sum(m.samples for k, m in self.members.items()
                     if m.role.trains and m.since > self.height - RECENT_JOIN_HEIGHTS and k not in self.ended)
        return 100 * (recent + tx.samples) <= budget

    def prune(self) -> None:
        """Bounded state: drop members that stopped counting, end trainers that never trained."""
        for k in [k for k, e in self.ended.items() if e + PRUNE_AFTER <= self.height]:
            if genesis_member(self.genesis, k):
                continue  # bounded by the genesis, and kept: a genesis key never joins again
            del self.ended[k]
            self.members.pop(k, None)
            self.balances.pop(k, None)
            self.reputation.pop(k, None)
        for k, m in self.members.items():
            if (m.role.trains and k not in self.ended and m.since + IDLE_HEIGHTS <= self.height
                    and self.balances.get(k, 0) == 0):
                self.ended[k] = self.height + CHANGE_DELAY

    def end(self, key: bytes) -> None:
        self.ended[key] = self.height + CHANGE_DELAY
        self.removals.pop(key, None)

    def check_and_apply(self, tx: MembershipTx) -> None:  # noqa: C901 - one rule per branch
        def refuse(reason: str) -> None:
            raise Refusal(reason, tx)

        g = self.genesis
        policy, cap = g.rules.admission, g.rules.max_members
        if policy == "genesis":
            refuse("membership_closed")
        if not tx.height < self.height <= tx.height + TX_TTL:
            refuse("expired" if self.height > tx.height else "future_height")
        h = tx.hash()
        if h in self.recent:
            refuse("duplicate")
        if not tx.verify(g.chain_id):
            refuse("bad_signature")
        if tx.kind == TxKind.JOIN:
            if self.known(tx.signer):
                refuse("already_member" if self.current(tx.signer) else "left_member")
            if tx.signer in self.requests:
                refuse("already_requested")
            if cap and self.seats() >= cap:
                refuse("cap_reached")
            if tx.samples > g.rules.max_samples_per_update:
                refuse("samples_over_cap")
            if self.joins >= g.rules.max_joins_per_block:
                refuse("join_budget")
            if not self.recent_weight_allows(tx):
                refuse("recent_weight_cap")
            if not self.power_cap_allows(tx):
                refuse("power_cap")
            if policy == "open" and tx.role == Role.TRAINER:  # no power: admitted at once
                self.admit(tx)
            elif len(self.requests) >= MAX_REQUESTS:
                refuse("too_many_requests")
            else:
                self.requests[tx.signer] = (tx, Ballot(self.height))
            self.joins += 1
        elif tx.kind in (TxKind.ADMIT, TxKind.REFUSE):
            if self.powers.get(tx.signer, 0) == 0:
                refuse("not_validator")
            pending = self.requests.get(tx.target)
            if pending is None:
                refuse("no_request")
                return
            join, ballot = pending
            if tx.signer in ballot.votes or tx.signer in ballot.against:
                refuse("already_voted")
            if tx.kind == TxKind.REFUSE:
                ballot = replace(ballot, against=ballot.against | {tx.signer})
                total = sum(self.powers.values())
                if 3 * sum(self.powers.get(v, 0) for v in ballot.against) > total:  # > 1/3: admission impossible
                    del self.requests[tx.target]
                else:
                    self.requests[tx.target] = (join, ballot)
            else:
                ballot = replace(ballot, votes=ballot.votes | {tx.signer})
                if self.quorum(ballot.votes):
                    if cap and self.seats() >= cap:
                        refuse("cap_reached")
                    if not self.recent_weight_allows(join):
                        refuse("recent_weight_cap")
                    if not self.power_cap_allows(join):
                        refuse("power_cap")
                    self.admit(join)
                else:
                    self.requests[tx.target] = (join, ballot)
        elif tx.kind == TxKind.REMOVE:
            if self.powers.get(tx.signer, 0) == 0:
                refuse("not_validator")
            if not self.current(tx.target):
                refuse("not_member")
            ballot = self.removals.get(tx.target) or Ballot(self.height)
            if tx.signer in ballot.votes:
                refuse("already_voted")
            ballot = replace(ballot, votes=ballot.votes | {tx.signer})
            if self.quorum(ballot.votes):
                if self.power_left_without(tx.target) == 0:
                    refuse("last_validator")
                self.end(tx.target)
            elif tx.target not in self.removals and len(self.removals) >= MAX_BALLOTS:
                refuse("too_many_ballots")
            else:
                self.removals[tx.target] = ballot
        elif tx.kind == TxKind.LEAVE:
            if tx.signer in self.requests:  # withdrawing a request that was not yet admitted
                del self.requests[tx.signer]
            elif not self.current(tx.signer):
                refuse("not_member")
            elif self.power_left_without(tx.signer) == 0:
                refuse("last_validator")
            else:
                self.end(tx.signer)
        self.recent[h] = tx.height + TX_TTL


def apply_txs(
    genesis: Genesis, state: AppState, txs: Sequence[MembershipTx], powers: Mapping[bytes, int],
    balances: dict[bytes, int], reputation: dict[bytes, int], *, skip_invalid: bool = False,
) -> tuple[Membership, list[MembershipTx]]:
    """Apply block state.height + 1's transactions in block order; `powers` are the voting powers in force at
    that height. A transaction that must not be there raises Refusal (the block is invalid), unless
    `skip_invalid` (the proposer choosing from its mempool). New members get their balance and reputation in
    the given maps. Returns the membership after the block and the transactions applied."""
    if len(txs) > MAX_TXS_PER_BLOCK and not skip_invalid:
        raise ValidationError("block: too many membership transactions")
    ms, height = state.membership, state.height + 1
    a = _Apply(genesis, height, dict(powers), dict(ms.members), dict(ms.requests), dict(ms.removals),
               dict(ms.ended), {k: e for k, e in ms.recent.items() if e >= height}, balances, reputation)
    # Ballots lapse TX_TTL heights after they opened, so abandoned requests and removals do not pile up.
    a.requests = {k: v for k, v in a.requests.items() if v[1].opened + TX_TTL >= height}
    a.removals = {k: b for k, b in a.removals.items() if b.opened + TX_TTL >= height}
    a.prune()
    applied: list[MembershipTx] = []
    for tx in txs:
        if len(applied) >= MAX_TXS_PER_BLOCK:
            break
        try:
            a.check_and_apply(tx)
        except Refusal:
            if not skip_invalid:
                raise
            continue
        applied.append(tx)
    return Membership(a.members, a.requests, a.removals, a.ended, a.recent), applied


def tx_problem(genesis: Genesis, state: AppState, tx: MembershipTx, powers: Mapping[bytes, int]) -> str | None:
    """Why `tx` could not go into the next block on its own (for the mempool and gossip), or None. The cheap
    checks and the signature come first: a forged tx from the network costs no copy of the state's maps."""
    height = state.height + 1
    if genesis.rules.admission == "genesis":
        return "membership_closed"
    if not tx.height < height <= tx.height + TX_TTL:
        return "expired" if height > tx.height else "future_height"
    if tx.hash() in state.membership.recent:
        return "duplicate"
    if not tx.verify(genesis.chain_id):
        return "bad_signature"
    try:
        apply_txs(genesis, state, [tx], powers, dict(state.balances), dict(state.reputation))
    except Refusal as exc:
        return exc.reason
    return None


def trainer_count(genesis: Genesis, state: AppState, height: int) -> int:
    """How many members may have an update in block `height` (what a proposer waits for by default)."""
    ms = state.membership
    if ms.empty():
        return len(genesis.validators)
    keys = [*genesis.powers, *ms.members]
    return sum(1 for k in keys if trains_at(genesis, state, k, height))


def shard_of(genesis: Genesis, data_seed: int) -> tuple[int, int]:
    """(shard index, shard count) of a joined member's built-in data: its seed picks one of max_members shards
    (or twice the genesis set when there is no cap), whatever its position in any list."""
    parts = genesis.rules.max_members or 2 * len(genesis.validators)
    return data_seed % parts, parts
