"""Tendermint ("The latest gossip on BFT consensus", Buchman, Kwon, Milosevic 2018) as a pure state machine.

`Tendermint.step(event) -> list[Action]`. No clock, no I/O, no randomness: the shell feeds events and performs
actions in order. After every event the machine re-evaluates the paper's `upon` rules until none fires, so the
order in which messages arrive never matters, only the set that has arrived.

Crash safety: before any own signed message leaves, the machine emits `Persist(record)`; the shell must fsync it
before performing the following actions. `Tendermint.restore` rebuilds the round, the lock and every message
already signed at that height from those records, so a restarted node re-sends what it signed and never signs a
different value for the same (height, round, type). The first record a node writes in a round r > 0 also keeps the
others' votes that moved it there (the 2f+1 precommits of r-1, or the f+1 votes of r): a restarted node resumes r and
can still relay them to peers left behind in r-1. Only the last record may be torn (the crash hit its write,
so nothing after it happened); the shell deletes it at startup (`check_records`) before appending new ones, and
an unreadable record anywhere else is a `RestoreError`: the node refuses to start rather than forget a signature.

Lost messages: gossip is best-effort. On every timeout the machine re-emits its own messages of the current round
(`Broadcast` again); a node that missed the decisive precommits is brought forward by `CommitReceived` (a block
and its certificate fetched by the shell's block sync); f+1 voting power seen in a higher round pulls a node there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

from flnode.protocol.encoding import pack_trusted as pack
from flnode.protocol.encoding import unpack
from flnode.protocol.errors import OversizeError, ProtocolError
from flnode.protocol.messages import (
    Block,
    CommitCertificate,
    DuplicateVoteEvidence,
    Proposal,
    Vote,
    VoteType,
)

from .actions import (
    Action,
    Broadcast,
    Commit,
    EmitEvidence,
    GetValue,
    Persist,
    ScheduleTimeout,
    ValidateValue,
)
from .events import (
    CommitReceived,
    Event,
    ProposalReceived,
    StartHeight,
    TimeoutFired,
    ValueReady,
    ValueValidated,
    VoteReceived,
)
from .types import Step, TimeoutConfig, TimeoutKind
from .validators import ValidatorSet
from .votes import MAX_VALUES_PER_VALIDATOR, RoundVotes

Signer = Callable[[str, bytes], bytes]


class RestoreError(ProtocolError):
    """The consensus records cannot be replayed safely (an unreadable record that is not the last one, or records
    of different heights): starting anyway could forget a signed vote and sign a conflicting one."""

    reason = "corrupt_records"


class SignRefused(Exception):
    """Raised by a Signer that refuses to sign (e.g. a last-sign guard that saw a conflicting signature). The
    machine then sends nothing for that step, as a silent validator would, and counts it in `sign_refusals`."""


class ShellMisuse(Exception):
    """The shell fed an input no correct shell can produce (a timeout the machine never scheduled, a value for a
    round it never asked for, a commit whose certificate is for another block, a height going back): a bug in the
    node, raised rather than dropped. Remote messages are never misuse: those are dropped and counted in
    `Tendermint.dropped`."""


PV, PC = int(VoteType.PREVOTE), int(VoteType.PRECOMMIT)  # vote-count keys on the hot path
FUTURE_BUFFER = 4096
# Each validator gets its own share of the future-height buffer (FUTURE_BUFFER // (n + 2)); signers outside the
# current set share one more, and the node's own shell (block sync, application answers) one more, so a flooding
# validator fills only its share and honest messages for the next height are still kept.
_OUTSIDERS = b"outsiders"
_LOCAL = b"local"
MAX_ROUND_AHEAD = 64  # messages for rounds further ahead are dropped (bounded memory under flooding)
MAX_REBROADCAST_MS = 30_000


class Tendermint:
    def __init__(
        self,
        validators: ValidatorSet,
        me: bytes | None,
        sign: Signer | None,
        timeouts: TimeoutConfig,
    ) -> None:
        self._key = me  # this node's validator address; it signs only while its power is positive
        self.validators = validators
        self.me = me if me is not None and validators.power(me) > 0 else None
        self.sign = sign
        self.timeouts = timeouts
        self.height = 0
        self.round = 0
        self.current_step = Step.PROPOSE
        self.decided: Block | None = None
        self.restored = False
        self.sign_refusals = 0  # signatures the Signer refused (SignRefused)
        self.dropped: Counter[str] = Counter()  # remote proposals and votes dropped, by reason
        self._quorum = validators.quorum()  # 2f+1: more than 2/3 of the power
        self._one_third = validators.total_power // 3  # f+1 is any power above this
        self._reset_height(0)
        self._future: list[Event] = []
        self._future_share = self._share()
        self._future_count: dict[bytes, int] = {}  # bucket (validator, _OUTSIDERS or _LOCAL) -> events buffered
        # (signer, height, round, type; 0 = proposal) -> the values buffered: at most MAX_VALUES_PER_VALIDATOR
        self._future_slots: dict[tuple[bytes, int, int, int], list[bytes | None]] = {}

    # ------------------------------------------------------------------ state

    def _reset_height(self, height: int) -> None:
        self.height = height
        self.round = 0
        self.current_step = Step.PROPOSE
        self.locked_value: Block | None = None
        self.locked_round = -1
        self.valid_value: Block | None = None
        self.valid_round = -1
        self.decided = None
        self.proposals: dict[int, Proposal] = {}  # round -> the proposer's first proposal (L22/L28 prevote on it)
        # (round, block hash) -> proposal: the first one and at most one conflicting one per round. L36 and L49 accept
        # any proposal from the proposer, so a node that saw an equivocating proposer's other block first can still
        # lock on / decide the block that gathered the quorum.
        self.proposal_values: dict[tuple[int, bytes], Proposal] = {}
        self.second_proposal: set[int] = set()
        self.blocks: dict[bytes, Block] = {}
        self.validity: dict[bytes, bool] = {}
        self.unfair: set[bytes] = set()  # valid blocks the application will not prevote as fresh proposals
        self.validating: set[bytes] = set()
        self.votes: dict[int, RoundVotes] = {}
        self._top_round = -1  # the highest round in self.votes
        # Kept up to date as votes are counted, so the rules never scan the (up to MAX_ROUND_AHEAD) future rounds:
        self._skip_round = -1  # the highest round with more than 1/3 of the power voting in it (L55)
        self._decidable: set[tuple[int, bytes]] = set()  # (round, value) with 2f+1 precommits (L49)
        self.signed: dict[tuple[int, int], Vote] = {}  # (round, type) -> own vote, never re-signed differently
        self.proposed: dict[int, Proposal] = {}
        self.asked_value: set[int] = set()
        self.fired: set[tuple[str, int]] = set()  # "first time" rules: (rule, round)
        self.rebroadcasts = 0
        self.started_round = False
        self.polka: tuple[int, bytes] | None = None  # (round, block hash) of the latest polka for a value
        # The others' votes that moved this node into its current round: the 2f+1 precommits of the round before
        # (L65) or the f+1 votes of the round (L55). Written into the first record the node persists in the round and
        # counted again on restore: a restarted node that resumes round r must still be able to relay why it left
        # r-1, or peers still in r-1 may never leave it (the votes it saw may have come from validators that have
        # moved on to the next height, or from a Byzantine one that never sends them again).
        self._entry: list[Vote] = []
        self._entry_saved = True

    def _round_votes(self, r: int) -> RoundVotes:
        rv = self.votes.get(r)
        if rv is None:
            rv = self.votes[r] = RoundVotes(self.validators)
            if r > self._top_round:
                self._top_round = r
        return rv

    def set_validators(self, validators: ValidatorSet) -> None:
        """Use `validators` from the next StartHeight on: call it between heights (after Commit, before
        StartHeight) or on a restored machine before its StartHeight. Quorums are recomputed, this node signs only
        if it has power in the new set, and the votes a restored machine holds are recounted by the new powers."""
        if self.started_round and self.decided is None:
            raise ValueError("set_validators while a height is in progress: call it after Commit, before StartHeight")
        self.validators = validators
        self.me = self._key if self._key is not None and validators.power(self._key) > 0 else None
        self._quorum = validators.quorum()
        self._one_third = validators.total_power // 3
        self._future_share = self._share()
        if self.decided is None and self.votes:
            old, self.votes, self._top_round, self.polka = self.votes, {}, -1, None
            self._skip_round, self._decidable = -1, set()
            for r in sorted(old):
                for counted in old[r].by_value.values():
                    for v in counted.values():
                        if v.validator in validators.powers:
                            rv = self._round_votes(r)
                            rv.add(v)
                            if rv.changed:
                                self._counted(rv, v)

    def _share(self) -> int:
        return max(1, FUTURE_BUFFER // (len(self.validators.powers) + 2))

    def _counted(self, rv: RoundVotes, v: Vote) -> None:
        """Update what the rules read after `rv` counted `v`: the latest polka, the L55 round, the L49 candidates."""
        bh = v.block_hash
        if bh is not None:
            if v.type == VoteType.PREVOTE:
                self._note_polka(rv, v)
            elif rv.power[(PC, bh)] >= self._quorum:
                self._decidable.add((v.round, bh))
        if v.round > self._skip_round and rv.voters_power > self._one_third:
            self._skip_round = v.round

    # ------------------------------------------------------------------ entry point

    def step(self, event: Event) -> list[Action]:  # noqa: C901 - one dispatch table
        out: list[Action] = []
        cls = type(event)
        if cls is StartHeight:
            assert isinstance(event, StartHeight)
            return self._on_start_height(event.height, out)
        remote = cls is VoteReceived or cls is ProposalReceived
        if cls is VoteReceived:
            h = event.vote.height  # type: ignore[union-attr]
        elif cls is ProposalReceived:
            h = event.proposal.height  # type: ignore[union-attr]
        else:
            h = _event_height(event)
            self._check_shell(event, h)
        if h > self.height or not self.started_round:
            if h <= self.height + 2 and cls is not TimeoutFired and len(self._future) < FUTURE_BUFFER:
                self._buffer(event, cls, h)
            elif remote:
                self.dropped["future_height"] += 1
            return out
        if self.decided is not None:
            if remote:
                self.dropped["decided"] += 1
            return out  # decided: the shell moves us to the next height
        if h < self.height:
            if remote:
                self.dropped["stale_height"] += 1
            return out  # an old height (a CommitReceived for it is ignored too: that height is decided)
        # Only an event that changed something can make a rule fire: a duplicate vote or an ignored proposal skips
        # the rule evaluation (the hot path of a busy network).
        if cls is VoteReceived:
            assert isinstance(event, VoteReceived)
            changed = self._on_vote(event.vote, out)
        elif cls is ProposalReceived:
            assert isinstance(event, ProposalReceived)
            changed = self._on_proposal(event.proposal, out)
        elif cls is TimeoutFired:
            assert isinstance(event, TimeoutFired)
            changed = self._on_timeout(event, out)
        elif cls is ValueValidated:
            assert isinstance(event, ValueValidated)
            self.validating.discard(event.block_hash)
            self.validity[event.block_hash] = event.valid
            if event.valid and not event.fair:
                self.unfair.add(event.block_hash)
            changed = True
        elif cls is ValueReady:
            assert isinstance(event, ValueReady)
            self._on_value_ready(event, out)
            changed = True
        elif cls is CommitReceived:
            assert isinstance(event, CommitReceived)
            self._on_commit_received(event, out)
            changed = True
        else:
            return out
        if changed:
            self._apply_rules(out)
        return out

    def _check_shell(self, ev: Event, h: int) -> None:
        """Raise ShellMisuse for an input of the node's own shell that it cannot have produced. What is merely
        late (a timer or an answer for a round or height the machine has left) is normal and dropped."""
        cls = type(ev)
        if cls is TimeoutFired or cls is ValueReady:
            r = ev.round  # type: ignore[union-attr]
            if h > self.height or (h == self.height and (r > self.round or not self.started_round)):
                what = "a timeout" if cls is TimeoutFired else "a value"
                raise ShellMisuse(f"{what} for height {h} round {r}, but the machine is at height {self.height} "
                                  f"round {self.round}{'' if self.started_round else ' (not started)'}")
        if cls is ValueReady:
            assert isinstance(ev, ValueReady)
            if ev.block.height != ev.height:
                raise ShellMisuse(f"a value for height {ev.height} holding a block of height {ev.block.height}")
            if h == self.height and ev.round == self.round and self.validators.proposer(h, ev.round) != self.me:
                raise ShellMisuse(f"a value for height {h} round {ev.round}, which this node does not propose")
        elif cls is ValueValidated and h > self.height:
            raise ShellMisuse(f"a verdict for height {h}, but the machine asks only for its height {self.height}")
        elif cls is CommitReceived:
            assert isinstance(ev, CommitReceived)
            c = ev.certificate
            if c.block_hash != ev.block.hash() or c.height != ev.block.height:
                raise ShellMisuse(f"a commit of height {ev.block.height} whose certificate is for another block")

    def _on_start_height(self, height: int, out: list[Action]) -> list[Action]:
        if height < self.height:
            raise ShellMisuse(f"StartHeight({height}) after height {self.height}: heights only go up")
        if height == self.height and self.started_round:
            return out
        if height == self.height and self.restored:
            self._start_round(self.round, out)  # resume the restored round; signed votes are re-sent, not re-made
        else:
            self._reset_height(height)
            self._start_round(0, out)
        pending, self._future = self._future, []
        self._future_count, self._future_slots = {}, {}
        for ev in pending:
            eh = _event_height(ev)
            if eh == self.height:
                out += self.step(ev)
            elif eh > self.height:
                self._buffer(ev, type(ev), eh)  # counted again against the (new) validator set's shares
        self._apply_rules(out)  # a restored round may already satisfy a rule
        return out

    def _buffer(self, event: Event, cls: type, h: int) -> None:
        """Keep an event of a later height (or of any height before the first StartHeight) for StartHeight. Bounded
        per signer: a validator's share of FUTURE_BUFFER, at most MAX_VALUES_PER_VALIDATOR values per (height, round,
        type), and no round that would be beyond MAX_ROUND_AHEAD when the height starts."""
        if cls is VoteReceived:
            v = event.vote  # type: ignore[union-attr]
            signer, r, kind, value = v.validator, v.round, int(v.type), v.block_hash
        elif cls is ProposalReceived:
            p = event.proposal  # type: ignore[union-attr]
            signer, r, kind, value = p.proposer, p.round, 0, p.block_hash
        else:  # from the node's own shell: block sync, application answers
            signer, r, kind, value = _LOCAL, 0, -1, None
        if r < 0 or r > (self.round if h == self.height else 0) + MAX_ROUND_AHEAD:
            self._drop("round_out_of_range")
            return
        bucket = signer if kind < 0 or signer in self.validators.powers else _OUTSIDERS
        n = self._future_count.get(bucket, 0)
        if n >= self._future_share:
            self._drop("future_share_full")
            return
        if kind >= 0:
            slot = (signer, h, r, kind)
            values = self._future_slots.get(slot)
            if values is None:
                self._future_slots[slot] = [value]
            elif value in values or len(values) >= MAX_VALUES_PER_VALIDATOR:
                self._drop("duplicate")  # or a third value: never counted at that height either
                return
            else:
                values.append(value)
        self._future_count[bucket] = n + 1
        self._future.append(event)

    # ------------------------------------------------------------------ inputs

    def _on_proposal(self, p: Proposal, out: list[Action]) -> bool:
        if p.height != self.height or p.round > self.round + MAX_ROUND_AHEAD or p.round < 0:
            return self._drop("round_out_of_range")
        first = self.proposals.get(p.round)
        if first is not None and (p.round in self.second_proposal or first.block_hash == p.block_hash):
            return self._drop("duplicate")  # or a third value of an equivocating proposer
        if p.pol_round >= p.round or p.pol_round < -1:
            return self._drop("bad_pol_round")
        if p.proposer != self.validators.proposer(p.height, p.round):
            return self._drop("not_the_proposer")
        if first is None:
            self.proposals[p.round] = p
        else:
            self.second_proposal.add(p.round)
        self.proposal_values[(p.round, p.block_hash)] = p
        self.blocks.setdefault(p.block_hash, p.block)
        if p.round == self.round:
            # Only the current round's proposals are validated on arrival (L22/L28/L36 need the answer); a later
            # round's when the node gets there (_start_round), any round's when 2f+1 precommit it (L49). So a flood
            # of proposals for rounds ahead costs no block fetch or execution.
            self._request_validation(p.block, p.round, out)
        return True

    def _request_validation(self, block: Block, r: int, out: list[Action]) -> None:
        bh = block.hash()
        if bh not in self.validity and bh not in self.validating:
            self.validating.add(bh)
            out.append(ValidateValue(self.height, r, block))

    def _on_vote(self, v: Vote, out: list[Action]) -> bool:
        if v.height != self.height or v.round > self.round + MAX_ROUND_AHEAD or v.round < 0:
            return self._drop("round_out_of_range")
        if v.validator not in self.validators.powers:
            return self._drop("not_a_validator")
        rv = self.votes.get(v.round)
        if rv is None:
            rv = self._round_votes(v.round)
        conflict = rv.add(v)
        if conflict is not None:
            out.append(EmitEvidence(DuplicateVoteEvidence.of(conflict, v)))
        if rv.changed:
            self._counted(rv, v)
            return True
        return self._drop("duplicate")

    def _drop(self, reason: str) -> bool:
        self.dropped[reason] += 1
        return False

    def _note_polka(self, rv: RoundVotes, v: Vote) -> None:
        """Remember the latest round with 2f+1 prevotes for a value, proposal seen or not: it is relayed on
        rebroadcast, so that a node locked on that value, or asked to accept it with that proof-of-lock round, gets
        the polka it missed (e.g. after a restart, which keeps only the node's own votes)."""
        if (self.polka is None or v.round > self.polka[0]) and rv.power_for(VoteType.PREVOTE, v.block_hash) >= self._quorum:
            assert v.block_hash is not None
            self.polka = (v.round, v.block_hash)

    def _on_value_ready(self, ev: ValueReady, out: list[Action]) -> None:
        if ev.round != self.round or self.current_step != Step.PROPOSE or ev.round in self.proposed:
            return
        if self.me is None or self.validators.proposer(self.height, ev.round) != self.me:
            return
        self.blocks[ev.block.hash()] = ev.block
        self.validity[ev.block.hash()] = True  # we built it by executing it
        self._propose(ev.block, -1, out)

    def _on_timeout(self, ev: TimeoutFired, out: list[Action]) -> bool:
        if ev.height != self.height or ev.round != self.round:
            return False
        if ev.kind == TimeoutKind.PROPOSE:
            if self.current_step == Step.PROPOSE:  # L57
                self._vote(VoteType.PREVOTE, None, out)
                self.current_step = Step.PREVOTE
                return True
            return False
        if ev.kind == TimeoutKind.PREVOTE:
            if self.current_step == Step.PREVOTE:  # L61
                self._vote(VoteType.PRECOMMIT, None, out)
                self.current_step = Step.PRECOMMIT
                return True
            return False
        if ev.kind == TimeoutKind.PRECOMMIT:  # L65
            self._rebroadcast(out)
            rv = self.votes.get(self.round)
            entry = [] if rv is None else [v for v in rv.by_type[PC].values() if v.validator != self.me]
            self._start_round(self.round + 1, out, entry)
            return True
        if ev.kind == TimeoutKind.REBROADCAST:
            # Keep re-sending while this round is stuck, backing off exponentially: the re-sends themselves must not
            # become the load that keeps a large network from finishing the round.
            self.rebroadcasts += 1
            base = self.timeouts.duration(TimeoutKind.REBROADCAST, self.round)
            delay = min(base << min(self.rebroadcasts, 5), MAX_REBROADCAST_MS)
            out.append(ScheduleTimeout(TimeoutKind.REBROADCAST, self.height, self.round, max(delay, base)))
            self._rebroadcast(out)
            self._relay_previous_round(out)
        return False  # re-sending changes nothing the rules read

    def _on_commit_received(self, ev: CommitReceived, out: list[Action]) -> None:
        """A block with a certificate the shell has verified (block sync): decide it directly."""
        if ev.block.height != self.height or self.decided is not None:
            return
        if ev.certificate.block_hash != ev.block.hash() or ev.certificate.height != self.height:
            return
        self.decided = ev.block
        out.append(Commit(self.height, ev.block, ev.certificate))

    # ------------------------------------------------------------------ the paper's rules

    def _apply_rules(self, out: list[Action]) -> None:
        changed = True
        while changed and self.decided is None:
            changed = self._rules_once(out)

    def _rules_once(self, out: list[Action]) -> bool:  # noqa: C901 - mirrors the paper
        h, r = self.height, self.round
        q = self._quorum

        # L49: a proposal of any round with 2f+1 precommits for it, and the value is valid -> decide.
        if self._decidable:
            for pr, bh in sorted(self._decidable):
                p = self.proposal_values.get((pr, bh))
                if p is None:
                    continue
                if self.validity.get(bh) is True:
                    self.decided = p.block
                    out.append(Commit(h, p.block, self.votes[pr].certificate(h, pr, bh)))
                    return False
                self._request_validation(p.block, pr, out)  # the rule needs the answer, whatever the round
        # L55: f+1 power in a higher round -> skip to it (the highest such round: the rounds between would be
        # started only to be left again at once).
        if self._skip_round > r:
            rv = self.votes[self._skip_round]
            entry = {v.validator: v for t in (PC, PV) for v in rv.by_type[t].values() if v.validator != self.me}
            self._start_round(self._skip_round, out, list(entry.values()))
            return True

        p = self.proposals.get(r)
        rv = self._round_votes(r)
        if p is not None and self.current_step == Step.PROPOSE:
            bh = p.block_hash
            valid = self.validity.get(bh)
            if p.pol_round == -1 and valid is not None:  # L22
                ok = valid and bh not in self.unfair and (self.locked_round == -1 or self._locked_hash() == bh)
                self._vote(VoteType.PREVOTE, bh if ok else None, out)
                self.current_step = Step.PREVOTE
                return True
            if 0 <= p.pol_round < r and valid is not None:  # L28
                pol = self.votes.get(p.pol_round)
                if pol is not None and pol.power_for(VoteType.PREVOTE, bh) >= q:
                    ok = valid and (self.locked_round <= p.pol_round or self._locked_hash() == bh)
                    self._vote(VoteType.PREVOTE, bh if ok else None, out)
                    self.current_step = Step.PREVOTE
                    return True
        # L34: 2f+1 prevotes of any kind, first time -> timeout prevote.
        if self.current_step == Step.PREVOTE and rv.total[PV] >= q and ("L34", r) not in self.fired:
            self.fired.add(("L34", r))
            out.append(self._timeout(TimeoutKind.PREVOTE))
        # L36: proposal valid with 2f+1 prevotes for it, step >= prevote, first time.
        if p is not None and self.current_step >= Step.PREVOTE and ("L36", r) not in self.fired:
            for cand in (p, self._second(r)) if r in self.second_proposal else (p,):
                bh = cand.block_hash
                if self.validity.get(bh) is True and rv.power.get((PV, bh), 0) >= q:
                    self.fired.add(("L36", r))
                    if self.current_step == Step.PREVOTE:
                        self.locked_value, self.locked_round = cand.block, r
                        self._vote(VoteType.PRECOMMIT, bh, out)
                        self.current_step = Step.PRECOMMIT
                    self.valid_value, self.valid_round = cand.block, r
                    return True
        # L44: 2f+1 prevotes for nil -> precommit nil.
        if self.current_step == Step.PREVOTE and rv.power.get((PV, None), 0) >= q:
            self._vote(VoteType.PRECOMMIT, None, out)
            self.current_step = Step.PRECOMMIT
            return True
        # L47: 2f+1 precommits of any kind, first time -> timeout precommit.
        if rv.total[PC] >= q and ("L47", r) not in self.fired:
            self.fired.add(("L47", r))
            out.append(self._timeout(TimeoutKind.PRECOMMIT))
        return False

    # ------------------------------------------------------------------ outputs

    def _second(self, r: int) -> Proposal:
        first = self.proposals[r].block_hash
        return next(p for (pr, bh), p in self.proposal_values.items() if pr == r and bh != first)

    def _locked_hash(self) -> bytes | None:
        return None if self.locked_value is None else self.locked_value.hash()

    def _timeout(self, kind: TimeoutKind) -> ScheduleTimeout:
        return ScheduleTimeout(kind, self.height, self.round, self.timeouts.duration(kind, self.round))

    def _start_round(self, r: int, out: list[Action], entry: list[Vote] | None = None) -> None:  # L11
        self.round = r
        if entry is not None:
            self._entry, self._entry_saved = entry, not entry
        self.current_step = Step.PROPOSE
        self.started_round = True
        self.rebroadcasts = 0
        out.append(self._timeout(TimeoutKind.REBROADCAST))
        p = self.proposals.get(r)
        if p is not None:  # received while the node was in an earlier round: validate it now
            self._request_validation(p.block, r, out)
            if r in self.second_proposal:
                self._request_validation(self._second(r).block, r, out)
        if self.me is not None and self.validators.proposer(self.height, r) == self.me:
            if r in self.proposed:  # restored: re-send (and count) what we proposed before the crash
                out.append(Broadcast(self.proposed[r]))
                self._on_proposal(self.proposed[r], out)
            elif self.valid_value is not None:  # L15-16: re-propose the valid value with its proof of lock round
                self._propose(self.valid_value, self.valid_round, out)
            elif r not in self.asked_value:
                self.asked_value.add(r)
                out.append(GetValue(self.height, r))
        out.append(self._timeout(TimeoutKind.PROPOSE))  # L21 (also for the proposer: GetValue may never answer)

    def _propose(self, block: Block, pol_round: int, out: list[Action]) -> None:
        r = self.round
        if self.me is None or self.sign is None or r in self.proposed:
            return
        p = Proposal(self.height, r, pol_round, block, self.me)
        try:
            p = replace(p, signature=self.sign(Proposal.KIND, p.sign_payload()))
        except SignRefused:
            self.sign_refusals += 1
            return
        self.proposed[r] = p
        out.append(Persist(_record("proposal", self.height, r, p.encode(), entry=self._take_entry())))
        out.append(Broadcast(p))
        self._on_proposal(p, out)

    def _vote(self, t: VoteType, bh: bytes | None, out: list[Action]) -> None:
        if self.me is None or self.sign is None:
            return
        key = (self.round, int(t))
        v = self.signed.get(key)
        if v is None:
            unsigned = Vote(t, self.height, self.round, bh, self.me)
            try:
                v = Vote(t, self.height, self.round, bh, self.me, self.sign(Vote.KIND, unsigned.sign_payload()))
            except SignRefused:
                self.sign_refusals += 1
                return
            self.signed[key] = v
            lock = polka = None
            if t == VoteType.PRECOMMIT and bh is not None and self.locked_value is not None:
                # the lock, and the 2f+1 prevotes behind it: a restarted node must still be able to show its proof
                # of lock (L28 needs it), even if the validators that prevoted are gone or Byzantine
                lock = self.locked_value.encode()
                rv_lock = self.votes.get(self.locked_round)
                polka = [x.encode() for x in rv_lock.votes_for(VoteType.PREVOTE, bh)] if rv_lock else []
            out.append(Persist(_record("vote", self.height, self.round, v.encode(), lock, polka, self._take_entry())))
        out.append(Broadcast(v))
        rv = self._round_votes(self.round)
        rv.add(v)
        if rv.changed:
            self._counted(rv, v)

    def _take_entry(self) -> list[bytes] | None:
        """The votes that moved us into this round, for the first record written in it (None once written)."""
        if self._entry_saved:
            return None
        self._entry_saved = True
        return [v.encode() for v in self._entry]

    def _relay_previous_round(self, out: list[Action]) -> None:
        """A peer still in round r-1 (it lost precommits of r-1 before GST) may never reach 2f+1 precommits there
        (L47) nor see f+1 messages of round r (L55) when few nodes are ahead, and the nodes ahead may need it for
        their quorum: a deadlock. So while round r is stuck, re-send the precommits of round r-1 that moved us on:
        ours and the ones we counted. A peer further behind skips to r-1 on them (L55), then counts them (L47). If we
        came to r by L55 instead, relay the others' votes of r that took us there (a peer behind skips on them too).
        Both survive a restart: the first record written in a round keeps them (`_entry`)."""
        if self.round == 0:
            return
        rv = self.votes.get(self.round - 1)
        if rv is not None:
            for vote in rv.by_type[PC].values():
                out.append(Broadcast(vote))
        for vote in self._entry:
            if vote.round == self.round:
                out.append(Broadcast(vote))

    def _rebroadcast(self, out: list[Action]) -> None:
        """Best-effort gossip: re-send what we signed in this round so peers that lost it can count it, and relay
        the polka (2f+1 prevotes) behind our valid value and the latest polka we saw: a peer that missed it cannot
        accept a re-proposal of that value (L28) and, locked elsewhere or not, would otherwise keep prevoting nil
        (CometBFT gossips the POL round's prevotes for the same reason)."""
        p = self.proposed.get(self.round)
        if p is not None:
            out.append(Broadcast(p))
        for t in (VoteType.PREVOTE, VoteType.PRECOMMIT):
            v = self.signed.get((self.round, int(t)))
            if v is not None:
                out.append(Broadcast(v))
        polkas = []
        if self.valid_value is not None and self.valid_round >= 0:
            polkas.append((self.valid_round, self.valid_value.hash()))
        if self.polka is not None and self.polka not in polkas:
            polkas.append(self.polka)
        for pr, vh in polkas:
            rv = self.votes.get(pr)
            if rv is not None:
                for vote in rv.votes_for(VoteType.PREVOTE, vh):
                    if vote.validator != self.me:
                        out.append(Broadcast(vote))
                own = self.signed.get((pr, int(VoteType.PREVOTE)))
                if own is not None and own.block_hash == vh and pr != self.round:
                    out.append(Broadcast(own))

    # ------------------------------------------------------------------ restore

    @staticmethod
    def check_records(records: Sequence[bytes]) -> int:
        """How many of `records` (one height's, in order) `restore` replays: all of them, or all but a torn last
        one, which the shell must then delete before it appends a new record. Raises RestoreError on an unreadable
        record that is not the last, or on records of different heights: the node must not start."""
        height = None
        for i, raw in enumerate(records):
            try:
                rec = _parse_record(raw)
            except _TornRecord as exc:
                if i == len(records) - 1:
                    return i
                raise RestoreError(f"consensus record {i} of {len(records)} is torn ({exc}) but not the last one: "
                                   "the records after it hold signed messages, refusing to restore") from None
            except _UNREADABLE as exc:
                # complete but undecodable: not a crash mid-write, and it may hold a signature
                raise RestoreError(f"consensus record {i} of {len(records)} is unreadable ({exc}), "
                                   "refusing to restore") from None
            if height is None:
                height = rec[1]
            elif rec[1] != height:
                raise RestoreError(f"consensus record {i} is for height {rec[1]}, the first one for {height}")
        return len(records)

    @classmethod
    def restore(
        cls,
        validators: ValidatorSet,
        me: bytes | None,
        sign: Signer | None,
        timeouts: TimeoutConfig,
        records: Sequence[bytes],
    ) -> Tendermint:
        """Rebuild from the Persist records of one height. A torn last record is skipped: it was never acted upon,
        because the shell performs nothing after a Persist until the fsync returned. Raises RestoreError where
        `check_records` does."""
        m = cls(validators, me, sign, timeouts)
        for kind, height, r, body, lock, polka, entry in map(_parse_record, records[: cls.check_records(records)]):
            if m.height == 0:
                m._reset_height(height)
            if entry:  # the votes that moved the node into round r (verified by the shell before they were counted)
                m._entry = [v for v in entry if v.height == m.height and v.round in (r - 1, r)]
                for v in m._entry:
                    if v.validator in validators.powers:
                        rv = m._round_votes(v.round)
                        rv.add(v)
                        if rv.changed:
                            m._counted(rv, v)
            if kind == "vote":
                assert isinstance(body, Vote)
                v = body
                m.signed[(v.round, int(v.type))] = v
                rv = m._round_votes(v.round)
                rv.add(v)
                if rv.changed:
                    m._counted(rv, v)
                if lock is not None:
                    if v.round >= m.locked_round:
                        m.locked_value, m.locked_round = lock, v.round
                        m.valid_value, m.valid_round = lock, v.round
                    for pv in polka:  # verified by the shell before it was counted and stored
                        if pv.height == m.height and pv.type == VoteType.PREVOTE and pv.block_hash == lock.hash():
                            rv = m._round_votes(pv.round)
                            rv.add(pv)
                            if rv.changed:
                                m._counted(rv, pv)
            else:
                assert isinstance(body, Proposal)
                m.proposed[body.round] = body
                m.asked_value.add(body.round)
            m.round = max(m.round, r)
            m.restored = True
        return m


class _TornRecord(Exception):
    """The record is not complete msgpack: the crash hit its write (a truncated record never parses)."""


_UNREADABLE = (ProtocolError, ValueError, TypeError, KeyError, IndexError)
ParsedRecord = tuple[str, int, int, Vote | Proposal, Block | None, list[Vote], list[Vote]]


def _parse_record(raw: bytes) -> ParsedRecord:
    """Decode one Persist record completely: _TornRecord if it is not complete msgpack, one of _UNREADABLE if
    its content does not decode."""
    try:
        fields = unpack(raw, max_size=Block.MAX_SIZE * 2 + 4096)
    except OversizeError:
        raise  # no truncation makes a record longer
    except ProtocolError as exc:
        raise _TornRecord(str(exc)) from None
    kind, height, r, body, lock = fields[:5]
    polka = fields[5] if len(fields) > 5 else None  # records written before polkas were kept have 5 fields
    # the votes that moved the node into round r: only in the first record of a round (and not in older records)
    entry = [Vote.decode(x) for x in fields[6] or ()] if len(fields) > 6 else []
    if not isinstance(height, int) or not isinstance(r, int):
        raise ValueError("height and round must be integers")
    if kind == "vote":
        v = Vote.decode(body)
        if (v.height, v.round) != (height, r):
            raise ValueError("vote does not match its record's height and round")
        block = None if lock is None else Block.decode(lock)
        return kind, height, r, v, block, [Vote.decode(x) for x in polka or ()], entry
    if kind == "proposal":
        p = Proposal.decode(body)
        if (p.height, p.round) != (height, r):
            raise ValueError("proposal does not match its record's height and round")
        return kind, height, r, p, None, [], entry
    raise ValueError(f"unknown record kind {kind!r}")


def _record(kind: str, height: int, r: int, body: bytes, lock: bytes | None = None,
            polka: list[bytes] | None = None, entry: list[bytes] | None = None) -> bytes:
    if entry:
        return pack([kind, height, r, body, lock, polka, entry])
    return pack([kind, height, r, body, lock, polka])  # the 6-field record (most records: no round entered)


def _event_height(ev: Event) -> int:
    if isinstance(ev, ProposalReceived):
        return ev.proposal.height
    if isinstance(ev, VoteReceived):
        return ev.vote.height
    if isinstance(ev, CommitReceived):
        return ev.block.height
    return getattr(ev, "height", 0)


__all__ = ["CommitCertificate", "RestoreError", "SignRefused", "Tendermint"]
