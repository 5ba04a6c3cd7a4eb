"""A deterministic simulated network of Tendermint machines on a virtual clock.

Everything random comes from one `random.Random(seed)`, so a seed replays exactly. The simulator plays the shell's
part: it signs with a cheap keyed hash (and drops messages whose signature does not check, as the real shell does),
answers GetValue/ValidateValue (as an application would: at once, slowly, only once the block's data has
arrived, and `invalid` for a block a Byzantine proposer built bad), decodes what arrives (a proposal whose block
body does not match its header is rejected there, as the real decoder does), keeps each node's Persist records (restart = Tendermint.restore from them, sometimes
with a torn last record), delivers blocks with certificates to nodes that fell behind (block sync), and runs the
faults: drop, delay, duplicate, reorder, partition/heal, crash/restart, Byzantine validators and Twins. Under a
flooding Byzantine validator it also watches the honest machines' buffers stay within their bounds.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field, replace
from typing import Any, cast

from flnode.consensus import (
    Broadcast,
    Commit,
    CommitReceived,
    EmitEvidence,
    GetValue,
    Persist,
    ProposalReceived,
    ScheduleTimeout,
    StartHeight,
    Tendermint,
    TimeoutConfig,
    TimeoutFired,
    TimeoutKind,
    ValidateValue,
    ValidatorSet,
    ValueReady,
    ValueValidated,
    VoteReceived,
)
from flnode.consensus.machine import FUTURE_BUFFER, MAX_ROUND_AHEAD
from flnode.consensus.votes import MAX_VALUES_PER_VALIDATOR
from flnode.protocol.errors import ProtocolError
from flnode.protocol.hashing import digest
from flnode.protocol.messages import (
    Block,
    BlockHeader,
    CommitCertificate,
    Proposal,
    UpdateAnnouncement,
    Vote,
    VoteType,
    list_hash,
)

Z = hashlib.sha256(b"z").digest()
# the header commitments of an empty body (what Block.check_body expects), so a sim block decodes like a real one
EMPTY_LIST_HASH = list_hash(())
EMPTY_COMMIT_HASH = digest(b"")
BAD_APP_HASH = hashlib.sha256(b"bad block").digest()  # a block whose execution the honest applications reject
# a body a Byzantine relayer swaps in under an honest header (the signature covers the header only)
SWAP_UPDATE = UpdateAnnouncement(1, Z, hashlib.sha256(b"swap").digest(), 1, 1, 0, 0, b"\x01" * 32, b"\x00" * 64)
FAULTS = ("drop", "delay", "dup", "partition", "crash")
BYZANTINE_MODES = ("split", "equivocate", "double_vote", "silent", "bad_signature", "unknown_block", "body_swap",
                   "flood")
# How the application answers ValidateValue. "invalid": the Byzantine validators build blocks marked bad when they
# propose, and every honest application answers valid=False for them. "slow": this node's application answers after
# a random delay (up to twice the round-0 propose timeout). "unavailable": the block's data has not reached this node
# yet: no answer at all until it arrives (later in sim time, sooner after GST), then the normal answer (the real node
# never reports 'invalid' for missing data). "immediate": the default, an answer 1 ms later.
VALIDATION_MODES = ("immediate", "invalid", "slow", "unavailable")
# what the delivery layer (decode, then signature check) decides about a message
OK, BAD_SIGNATURE, BAD_BODY = 0, 1, 2


def fake_sign(key: bytes, kind: str, payload: bytes) -> bytes:
    return hashlib.sha256(key + kind.encode() + payload).digest() * 2


def fake_verify(key: bytes, kind: str, payload: bytes, sig: bytes) -> bool:
    return sig == fake_sign(key, kind, payload)


def make_block(height: int, proposer: bytes, salt: int, bad: bool = False) -> Block:
    """An empty block; `bad`: its claimed result (app hash) is wrong, so honest applications judge it invalid."""
    return Block(BlockHeader("sim", height, Z, proposer, salt, EMPTY_LIST_HASH, EMPTY_LIST_HASH, EMPTY_COMMIT_HASH,
                             Z, BAD_APP_HASH if bad else Z))


def body_matches(block: Block) -> bool:
    """Block.check_body as the decoder runs it; an empty body (every honest sim block) is three comparisons."""
    h = block.header
    if not block.updates and not block.evidence and block.last_commit is None:
        return (h.updates_hash == EMPTY_LIST_HASH and h.evidence_hash == EMPTY_LIST_HASH
                and h.last_commit_hash == EMPTY_COMMIT_HASH)
    try:
        block.check_body()
    except ProtocolError:
        return False
    return True


@dataclass
class SimConfig:
    nodes: int = 4
    byzantine: int = 0
    heights: int = 10
    seed: int = 0
    faults: tuple[str, ...] = ()
    byzantine_modes: tuple[str, ...] = BYZANTINE_MODES
    # ValidateValue answers (VALIDATION_MODES): "invalid" applies to the Byzantine proposers; the answer modes
    # (immediate/slow/unavailable) are handed to the honest nodes in turn, node i taking the (i mod k)-th
    validation: tuple[str, ...] = ()
    check_body: bool = True  # the decoder rejects a block whose body does not match its header (False: the old one)
    flood_burst: int = 6  # junk messages a "flood" validator signs per message it sends
    twins: bool = False
    drop_p: float = 0.1
    dup_p: float = 0.05
    max_delay_ms: int = 40
    gst_ms: int = 20_000  # faults stop here at the latest (global stabilisation time)
    fault_ms_per_height: int = 400  # ... or earlier: GST = min(gst_ms, 1000 + this x heights), so faults hit a run
    liveness_ms_per_height: int = 30_000
    timeouts: TimeoutConfig = field(default_factory=lambda: TimeoutConfig(300, 100, 200, 100, 200, 100))
    max_events: int = 2_000_000
    # Open membership: every this many heights the validator set changes (0: never): a random subset of the nodes
    # with random powers 1..3, Byzantine nodes holding less than 1/3 of each set's power. The nodes outside a set
    # keep running as followers (and a Byzantine one's votes must not count); proposer priorities carry over.
    set_changes: int = 0


@dataclass
class SimResult:
    seed: int
    heights_committed: int  # min over honest nodes
    node_heights: int  # sum over honest nodes
    max_round: int
    messages: int
    safety_violations: list[str]  # forks between honest nodes, and honest double-signs
    liveness_failures: list[str]
    certificate_failures: list[str]
    virtual_ms: int
    events: int
    rounds: int = 0  # rounds used, summed over heights (1 per height when every height decides in round 0)
    decided_heights: int = 0  # heights some honest node committed
    crashes: int = 0
    torn_records: int = 0
    decode_rejections: int = 0  # proposals the receivers' decoder rejected (body does not match header)
    invalid_answers: int = 0  # ValidateValue answered valid=False by an honest application
    late_answers: int = 0  # ValidateValue answers that came after the round's propose timeout would have fired
    flood_messages: int = 0  # junk messages sent by flooding validators
    max_future: int = 0  # most events an honest machine held for later heights
    max_rounds_stored: int = 0  # most rounds with vote storage in one honest machine at one height
    max_round_ahead: int = 0  # furthest round above its current one that an honest machine stored votes for
    max_votes_per_round: int = 0  # most votes an honest machine stored for one round
    set_changes: int = 0  # validator-set changes applied (SimConfig.set_changes)
    memory_failures: list[str] = field(default_factory=list)  # honest buffers above their bounds

    @property
    def ok(self) -> bool:
        return not (self.safety_violations or self.liveness_failures or self.certificate_failures
                    or self.memory_failures)


@dataclass
class _Node:
    idx: int
    key: bytes
    honest: bool
    machine: Tendermint | None
    records: list[bytes] = field(default_factory=list)
    up: bool = True
    commits: dict[int, bytes] = field(default_factory=dict)
    blocks: dict[int, tuple[Block, CommitCertificate]] = field(default_factory=dict)
    mode: str = ""
    answers: str = "immediate"  # how this node's application answers ValidateValue (VALIDATION_MODES)
    bad_blocks: bool = False  # builds blocks the honest applications reject (Byzantine, validation "invalid")
    tear_next: bool = False  # crash while writing the next Persist record (a torn last record)
    torn: bool = False  # the last record in `records` is torn


class Simulation:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        n = cfg.nodes
        keys = [hashlib.sha256(b"validator-%d" % i).digest() for i in range(n)]
        self.validators = ValidatorSet({k: 1 for k in keys})
        self.schedule: list[tuple[int, dict[bytes, int]]] = [(1, dict(self.validators.powers))]
        self._set_cache: dict[int, ValidatorSet] = {0: self.validators}
        self.nodes: list[_Node] = []
        byz = set(range(n - cfg.byzantine, n))
        for i, k in enumerate(keys):
            honest = i not in byz
            mode = "" if honest else cfg.byzantine_modes[(i - (n - cfg.byzantine)) % len(cfg.byzantine_modes)]
            self.nodes.append(_Node(i, k, honest, self._machine(k), mode=mode))
        bad_modes = [v for v in cfg.validation if v not in VALIDATION_MODES]
        if bad_modes:
            raise ValueError(f"unknown validation mode(s) {bad_modes}; choose from {VALIDATION_MODES}")
        answer_modes = [v for v in cfg.validation if v != "invalid"]
        for nd in self.nodes:
            if not nd.honest and "invalid" in cfg.validation:
                nd.bad_blocks = True
            if nd.honest and answer_modes:
                nd.answers = answer_modes[nd.idx % len(answer_modes)]
        self.arrivals: dict[tuple[int, bytes], int] = {}  # (node, block hash) -> when the block's data arrives
        if cfg.twins and n >= 2:
            # A twin: a second honest copy of validator 0's key. Together they behave like one Byzantine validator.
            self.nodes.append(_Node(n, keys[0], False, self._machine(keys[0]), mode="twin"))
            self.nodes[0].honest = False
            self.nodes[0].mode = "twin"
        self.queue: list[tuple[int, int, int, object]] = []
        self.seq = 0
        self.now = 0
        self.messages = 0
        self.partition: list[set[int]] | None = None
        # colluding "split" attackers: per (height, round), the two values shown to the two halves of the network
        self.split_values: dict[tuple[int, int], tuple[Block, Block]] = {}
        # every message an honest node signed: (key, height, round, kind) -> value; a second value is a double-sign
        self.signatures: dict[tuple[bytes, int, int, int], bytes | None] = {}
        self.double_signs: list[str] = []
        self.done = 0  # honest nodes that committed every height
        self.honest_count = sum(1 for nd in self.nodes if nd.honest)
        self.crashes = 0
        self.torn_records = 0
        self.decode_rejections = 0
        self.invalid_answers = 0
        self.late_answers = 0
        self.flood_messages = 0
        self.relayed: set[tuple[int, bytes]] = set()  # (relayer, proposal signature) a body_swap node relayed
        self.flooders = any(nd.mode == "flood" for nd in self.nodes)
        self.max_future = self.max_rounds_stored = self.max_round_ahead = self.max_votes_per_round = 0
        self.memory_failures: list[str] = []
        self.votes_bound = 2 * MAX_VALUES_PER_VALIDATOR * n  # per round: two values per (validator, type) at most
        if self.flooders:  # watch the honest machines' memory on every delivery (flood runs only: no cost otherwise)
            self._deliver = self._deliver_watched  # type: ignore[method-assign]
        self.max_delay = cfg.max_delay_ms if "delay" in cfg.faults else 5
        self.drop_p = cfg.drop_p if "drop" in cfg.faults else 0.0
        self.dup_p = cfg.dup_p if "dup" in cfg.faults else 0.0
        self.gst = min(cfg.gst_ms, 1_000 + cfg.fault_ms_per_height * cfg.heights)
        self._plan_faults()
        if cfg.set_changes:
            if cfg.twins:
                raise ValueError("set_changes and twins do not combine")
            self._plan_sets(keys, byz)
        self.last_fault_ms = max((at for at, _, idx, _ in self.queue if idx < 0), default=0)

    def add_twin(self, idx: int) -> int:
        """Start a second, honest copy of node idx's key (Twins): from now on the pair counts as one faulty
        validator. The twin is a copy of the original's chain (its committed blocks, as a copied home would hold)
        with a fresh machine, starting at the original's height; returns the twin's index."""
        orig = self.nodes[idx]
        twin = _Node(len(self.nodes), orig.key, False, self._machine(orig.key), mode="twin",
                     commits=dict(orig.commits), blocks=dict(orig.blocks))  # a restart resumes above them
        self.nodes.append(twin)
        if orig.honest:
            orig.honest = False
            orig.mode = "twin"
            self.honest_count -= 1
            if len(orig.commits) >= self.cfg.heights:
                self.done -= 1
        if self.partition is not None:
            self.partition[self.rng.randrange(len(self.partition))].add(twin.idx)
        height = max(orig.commits, default=0) + 1
        assert twin.machine is not None
        if height <= self.cfg.heights:
            self._perform(twin.idx, twin.machine.step(StartHeight(height)))
        return twin.idx

    def _plan_sets(self, keys: list[bytes], byz: set[int]) -> None:
        """A new validator set every cfg.set_changes heights, Byzantine power below 1/3 of each."""
        rng, n = self.rng, len(keys)
        for h in range(1 + self.cfg.set_changes, self.cfg.heights + 1, self.cfg.set_changes):
            while True:
                members = rng.sample(range(n), rng.randint(max(1, n - 3), n))
                powers = {keys[i]: rng.randint(1, 3) for i in members}
                bad = sum(p for i, p in zip(members, powers.values(), strict=True) if i in byz)
                if 3 * bad < sum(powers.values()):
                    break
            self.schedule.append((h, powers))

    def set_at(self, height: int) -> ValidatorSet:
        """The set in force at `height`, priorities carried across the changes before it."""
        k = sum(1 for h, _ in self.schedule[1:] if h <= height)
        vs = self._set_cache.get(k)
        if vs is None:
            vs = self._set_cache[k] = ValidatorSet.carried(self.set_at(self.schedule[k][0] - 1), self.schedule[k][1],
                                                          self.schedule[k][0])
        return vs

    def _machine(self, key: bytes) -> Tendermint:
        return Tendermint(self.validators, key, lambda kind, payload, k=key: fake_sign(k, kind, payload), self.cfg.timeouts)

    # ---------------------------------------------------------------- scheduling

    def _push(self, at: int, node: int, item: object) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, node, item))

    def _plan_faults(self) -> None:
        cfg, rng = self.cfg, self.rng
        total = len(self.nodes)
        gst = self.gst
        if "partition" in cfg.faults or cfg.twins:
            for _ in range(rng.randint(1, 3)):
                start = rng.randint(0, gst // 2)
                end = min(gst, start + rng.randint(gst // 10, gst // 2))
                members = list(range(total))
                rng.shuffle(members)
                cut = rng.randint(1, total - 1)
                self._push(start, -1, ("partition", [set(members[:cut]), set(members[cut:])]))
                self._push(end, -1, ("heal", None))
            if cfg.twins:
                # keep the twins apart for a while: the classic Twins scenario
                a, b = 0, total - 1
                others = [i for i in range(total) if i not in (a, b)]
                rng.shuffle(others)
                half = len(others) // 2
                self._push(0, -1, ("partition", [{a, *others[:half]}, {b, *others[half:]}]))
                self._push(gst // 2, -1, ("heal", None))
        if "crash" in cfg.faults:
            for _ in range(rng.randint(1, 3)):
                victim = rng.randrange(total)
                down = rng.randint(0, gst - gst // 10)
                # short outages restart a node inside the round it left (the hard case for crash safety), long ones
                # after the others moved on (the block-sync case)
                up = min(gst, down + (rng.randint(1, 150) if rng.random() < 0.5 else rng.randint(150, gst // 4)))
                self._push(down, -1, ("crash_torn" if rng.random() < 0.3 else "crash", victim))
                self._push(up, -1, ("restart", victim))

    def _reachable(self, a: int, b: int) -> bool:
        if self.partition is None:
            return True
        return any(a in g and b in g for g in self.partition)

    def _send(self, src: int, dst: int, msg: Proposal | Vote, verdict: int | None = None) -> None:
        """Queue one copy of msg for dst. The delivery layer decodes the message and checks its signature the way the
        shell does; both are pure functions of the message, so the verdict (OK, BAD_BODY, BAD_SIGNATURE) is computed
        once per message and carried along."""
        rand = self.rng.random
        self.messages += 1
        if verdict is None:
            verdict = self._check_message(msg)
        if self.now < self.gst:
            if self.drop_p and rand() < self.drop_p:
                return
            delay = 1 + int(rand() * self.max_delay)  # reorder: independent delays
            if self.dup_p and rand() < self.dup_p:
                self._push(self.now + delay + int(rand() * 21), dst, ("msg", src, msg, verdict))
        else:
            delay = 1 + int(rand() * 5)
        self.seq += 1
        heapq.heappush(self.queue, (self.now + delay, self.seq, dst, ("msg", src, msg, verdict)))

    def _check_message(self, msg: Proposal | Vote) -> int:
        if type(msg) is Proposal and self.cfg.check_body and not body_matches(msg.block):
            return BAD_BODY
        return OK if _verify_message(msg) else BAD_SIGNATURE

    def _broadcast(self, src: int, msg: Proposal | Vote) -> None:
        node = self.nodes[src]
        total = len(self.nodes)
        if node.honest or node.mode == "twin":
            if node.honest:
                self._note_signature(node, msg)
            ok = self._check_message(msg)
            for t in range(total):
                if t != src:
                    self._send(src, t, msg, ok)
            return
        targets = [i for i in range(total) if i != src]
        mode = node.mode
        if mode == "silent":
            return
        if mode == "flood":
            verdict = self._check_message(msg)
            for t in targets:
                self._send(src, t, msg, verdict)
            self._flood(node, msg, targets)
            return
        if mode == "split":
            self._split(node, msg, targets)
            return
        if mode == "bad_signature":
            for t in targets:
                self._send(src, t, replace(msg, signature=b"\x00" * 64))
            return
        if mode == "unknown_block" and isinstance(msg, Vote):
            bogus = hashlib.sha256(msg.signature).digest()
            v = replace(msg, block_hash=bogus)
            v = replace(v, signature=fake_sign(node.key, Vote.KIND, v.sign_payload()))
            for t in targets:
                self._send(src, t, v)
            return
        if mode in ("equivocate", "double_vote"):
            # half the network sees one message, the other half a conflicting one
            half = set(self.rng.sample(targets, len(targets) // 2))
            other = self._conflicting(node, msg, mode)
            for t in targets:
                self._send(src, t, other if (t in half and other is not None) else msg)
            return
        for t in targets:
            self._send(src, t, msg)

    def _flood(self, node: _Node, msg: Proposal | Vote, targets: list[int]) -> None:
        """With every message it sends, a flooding validator also signs a burst of junk for rounds far ahead and for
        the next heights: votes for random values, and proposals for the rounds it leads. Every one carries a good
        signature, so only the machine's own bounds (FUTURE_BUFFER, MAX_ROUND_AHEAD, two values per validator and
        round) keep it from growing the honest nodes' memory."""
        rng, key = self.rng, node.key
        h, r = msg.height, msg.round
        for _ in range(self.cfg.flood_burst):
            fh = h + rng.randint(0, 3)
            x = rng.random()
            if x < 0.3:
                fr = r + rng.randint(1, MAX_ROUND_AHEAD)
            elif x < 0.6:
                fr = r + rng.randint(MAX_ROUND_AHEAD + 1, 4 * MAX_ROUND_AHEAD)
            else:
                fr = rng.randint(0, 1 << 20)
            junk: Proposal | Vote
            if rng.random() < 0.25:
                lead = [rr for rr in range(r, r + 2 * MAX_ROUND_AHEAD) if self.set_at(fh).proposer(fh, rr) == key]
                pr = rng.choice(lead)
                p = Proposal(fh, pr, -1, make_block(fh, key, rng.randint(1 << 30, 1 << 40), node.bad_blocks), key)
                junk = replace(p, signature=fake_sign(key, Proposal.KIND, p.sign_payload()))
            else:
                bh = None if rng.random() < 0.2 else rng.randbytes(32)
                v = Vote(VoteType.PREVOTE if rng.random() < 0.5 else VoteType.PRECOMMIT, fh, fr, bh, key)
                junk = replace(v, signature=fake_sign(key, Vote.KIND, v.sign_payload()))
            self.flood_messages += 1
            verdict = self._check_message(junk)
            for t in targets:
                self._send(node.idx, t, junk, verdict)

    def _relay_swapped(self, node: _Node, src: int, p: Proposal) -> None:
        """A Byzantine relayer forwards a proposal it received with the same header (so the proposer's signature still
        verifies) but another body. The receivers' decoder rejects it; with check_body off it would be accepted."""
        mark = (node.idx, p.signature)
        if mark in self.relayed:
            return
        self.relayed.add(mark)
        swapped = replace(p, block=replace(p.block, updates=(SWAP_UPDATE,)))
        verdict = self._check_message(swapped)
        for t in range(len(self.nodes)):
            if t != node.idx and t != src:
                self._send(node.idx, t, swapped, verdict)

    def _split(self, node: _Node, msg: Proposal | Vote, targets: list[int]) -> None:
        """Show one value to the even-numbered nodes and another to the odd ones, as proposer and as voter."""
        key = (msg.height, msg.round)
        if isinstance(msg, Proposal):
            other = make_block(msg.height, node.key, 77_000 + msg.round, node.bad_blocks)
            self.split_values[key] = (msg.block, other)
            q = replace(msg, block=other, pol_round=-1)
            q = replace(q, signature=fake_sign(node.key, Proposal.KIND, q.sign_payload()))
            for t in targets:
                self._send(node.idx, t, msg if t % 2 == 0 else q)
            return
        pair = self.split_values.get(key)
        if pair is None:
            for t in targets:
                self._send(node.idx, t, msg)
            return
        for t in targets:
            v = replace(msg, block_hash=pair[t % 2].hash())
            self._send(node.idx, t, replace(v, signature=fake_sign(node.key, Vote.KIND, v.sign_payload())))

    def _note_signature(self, node: _Node, msg: Proposal | Vote) -> None:
        """Honest nodes never sign two different messages for one (height, round, type), across restarts too."""
        if isinstance(msg, Vote):
            if msg.validator != node.key:
                return  # a relayed vote of another validator (the polka behind the valid value)
            key, value = (node.key, msg.height, msg.round, int(msg.type)), msg.block_hash
        else:
            key, value = (node.key, msg.height, msg.round, 0), msg.block_hash
        old = self.signatures.setdefault(key, value)
        if old != value:
            self.double_signs.append(f"node {node.idx} signed two values at (height, round, type) {key[1:]}")

    def _conflicting(self, node: _Node, msg: Proposal | Vote, mode: str) -> Proposal | Vote | None:
        if isinstance(msg, Proposal) and mode == "equivocate":
            block = make_block(msg.height, node.key, 10_000 + msg.round + self.rng.randint(0, 1 << 20), node.bad_blocks)
            p = replace(msg, block=block, pol_round=-1)
            return replace(p, signature=fake_sign(node.key, Proposal.KIND, p.sign_payload()))
        if isinstance(msg, Vote):
            alt = None if msg.block_hash is not None else hashlib.sha256(b"alt%d" % msg.round).digest()
            # prefer a real competing value: the last proposal this node saw for the round
            m = node.machine
            if m is not None:
                for p in m.proposals.values():
                    if p.round == msg.round and p.block_hash != msg.block_hash:
                        alt = p.block_hash
            v = replace(msg, block_hash=alt)
            return replace(v, signature=fake_sign(node.key, Vote.KIND, v.sign_payload()))
        return None

    # ---------------------------------------------------------------- running

    def _perform(self, idx: int, actions: list[object]) -> None:
        node = self.nodes[idx]
        for a in actions:
            if not node.up:
                return
            cls = type(a)
            if cls is Broadcast:
                self._broadcast(idx, a.message)  # type: ignore[attr-defined]
            elif cls is ScheduleTimeout:
                t = cast(ScheduleTimeout, a)
                self.seq += 1
                heapq.heappush(self.queue, (self.now + t.duration_ms, self.seq, idx,
                                            TimeoutFired(t.kind, t.height, t.round)))
            elif cls is Persist:
                record = cast(Persist, a).record
                if node.tear_next:  # the crash hits while this record is written: nothing after it happens
                    node.records.append(record[: self.rng.randrange(len(record))])
                    node.torn = True
                    node.tear_next = False
                    node.up = False
                    self.torn_records += 1
                    return
                node.records.append(record)
            elif isinstance(a, GetValue):
                block = make_block(a.height, node.key, a.round, node.bad_blocks)
                self._push(self.now + 1, idx, ValueReady(a.height, a.round, block))
            elif isinstance(a, ValidateValue):
                block = a.block
                valid = self._judge(block)
                if node.answers == "immediate":
                    at = self.now + 1
                else:
                    at = self._answer_time(node, block.hash(), a.round)
                if not valid and node.honest:
                    self.invalid_answers += 1
                self._push(at, idx, ValueValidated(a.height, a.round, block.hash(), valid))
            elif isinstance(a, Commit):
                if a.height in node.commits:
                    continue
                if self.flooders and node.honest and node.machine is not None:
                    self._watch(node, node.machine, full=True)
                node.commits[a.height] = a.block.hash()
                node.blocks[a.height] = (a.block, a.certificate)
                if node.honest and len(node.commits) == self.cfg.heights:
                    self.done += 1
                node.records.clear()  # records are per height; the store prunes older ones
                if a.height < self.cfg.heights:
                    self._push(self.now, idx, StartHeight(a.height + 1))
            elif isinstance(a, EmitEvidence):
                pass

    def _judge(self, block: Block) -> bool:
        """The application's verdict after executing the block: a bad block's claimed result does not match."""
        return block.header.app_hash != BAD_APP_HASH

    def _answer_time(self, node: _Node, bh: bytes, r: int) -> int:
        now, rng = self.now, self.rng
        propose = self.cfg.timeouts.duration(TimeoutKind.PROPOSE, r)
        if node.answers == "slow":  # re-executing the block takes a while, sometimes past the propose timeout
            at = now + rng.randint(1, 2 * self.cfg.timeouts.duration(TimeoutKind.PROPOSE, 0))
        else:  # "unavailable": nothing until the block's data arrives (sooner once the network is stable)
            arrival = self.arrivals.get((node.idx, bh))
            if arrival is None:
                arrival = now + (rng.randint(50, 1_500) if now < self.gst else rng.randint(10, 300))
                self.arrivals[(node.idx, bh)] = arrival
            at = max(now + 1, arrival)
        if at - now >= propose:
            self.late_answers += 1
        return at

    def _deliver_watched(self, idx: int, item: object) -> None:
        Simulation._deliver(self, idx, item)
        node = self.nodes[idx]
        m = node.machine
        if node.honest and m is not None and type(item) is tuple:
            self._watch(node, m, full=False)

    def _watch(self, node: _Node, m: Tendermint, full: bool) -> None:
        """Record an honest machine's buffer sizes and flag any above the machine's bounds."""
        fut = len(m._future)
        if fut > self.max_future:
            self.max_future = fut
            if fut > FUTURE_BUFFER:
                self.memory_failures.append(f"node {node.idx}: {fut} future events buffered (bound {FUTURE_BUFFER})")
        stored = len(m.votes)
        if stored > self.max_rounds_stored:
            self.max_rounds_stored = stored
        if m._top_round - m.round > self.max_round_ahead:
            self.max_round_ahead = m._top_round - m.round
            if self.max_round_ahead > MAX_ROUND_AHEAD:
                self.memory_failures.append(
                    f"node {node.idx}: votes stored {self.max_round_ahead} rounds ahead (bound {MAX_ROUND_AHEAD})")
        if stored > m.round + MAX_ROUND_AHEAD + 1:
            self.memory_failures.append(f"node {node.idx}: {stored} rounds stored at round {m.round}")
        if full:
            for r, rv in m.votes.items():
                count = sum(len(d) for d in rv.by_value.values())
                if count > self.max_votes_per_round:
                    self.max_votes_per_round = count
                    if count > self.votes_bound:
                        self.memory_failures.append(
                            f"node {node.idx}: {count} votes stored for round {r} (bound {self.votes_bound})")
            per_round = len(m.proposal_values)
            if per_round > 2 * (m.round + MAX_ROUND_AHEAD + 1):
                self.memory_failures.append(f"node {node.idx}: {per_round} proposals stored at round {m.round}")

    def _deliver(self, idx: int, item: object) -> None:
        node = self.nodes[idx]
        m = node.machine
        if not node.up or m is None:
            return
        if type(item) is tuple:
            _, src, msg, verdict = item
            if self.partition is not None and not self._reachable(src, idx):
                return
            if verdict:
                if verdict == BAD_BODY:
                    self.decode_rejections += 1  # the decoder rejects the block: body and header disagree
                return  # the shell drops a message that does not decode or whose signature does not verify
            ev: object
            if type(msg) is Vote:
                ev = VoteReceived(msg)
            else:
                if node.mode == "body_swap":
                    self._relay_swapped(node, src, msg)
                ev = ProposalReceived(msg)
            if msg.height > m.height:
                self._sync(idx)
            self._perform(idx, m.step(ev))  # type: ignore[arg-type]
            return
        if isinstance(item, StartHeight) and len(self.schedule) > 1:
            vs = self.set_at(item.height)
            if vs is not m.validators and (m.decided is not None or not m.started_round):
                m.set_validators(vs)
        if isinstance(item, TimeoutFired):
            if item.height != m.height or item.round != m.round or m.decided is not None:
                return  # a stale timer: the machine ignores it (fast path; same behaviour)
            if item.kind == TimeoutKind.REBROADCAST:
                self._sync(idx)
                if self.flooders and node.honest:
                    self._watch(node, m, full=True)
        self._perform(idx, m.step(item))  # type: ignore[arg-type]

    def _sync(self, idx: int) -> None:
        """Block sync: a reachable peer that committed our current height hands over block + certificate."""
        node = self.nodes[idx]
        m = node.machine
        if m is None:
            return
        h = m.height
        for other in self.nodes:
            if other.idx != idx and (other.honest or other.mode == "twin") and h in other.blocks and self._reachable(other.idx, idx):
                block, cert = other.blocks[h]
                self._push(self.now + self.rng.randint(1, 10), idx, CommitReceived(block, cert))
                return

    def _control(self, item: tuple[str, Any]) -> None:
        what, arg = item
        if what == "partition":
            self.partition = arg
        elif what == "heal":
            self.partition = None
        elif what in ("crash", "crash_torn"):
            node = self.nodes[int(arg)]
            if not node.up:
                return
            self.crashes += 1
            if what == "crash_torn":
                node.tear_next = True  # the crash lands in the middle of the node's next Persist
            else:
                node.up = False
        elif what == "restart":
            node = self.nodes[int(arg)]
            node.tear_next = False
            if node.up:
                return
            # A restarted process has no timers and no pending application answers of its previous life: a timer
            # the old machine set (say the precommit timeout of L47, after 2f+1 precommits the restart forgot) must
            # not fire in the new one. Messages still in flight to it are kept (the network delivers them).
            q = self.queue
            if any(i == node.idx and type(it) is not tuple for _, _, i, it in q):
                self.queue = [e for e in q if e[2] != node.idx or type(e[3]) is tuple]
                heapq.heapify(self.queue)
            records = list(node.records)
            if node.torn:  # the store drops the torn tail at open, after the machine has been shown it
                node.records.pop()
                node.torn = False
            committed = max(node.commits, default=0)
            node.machine = Tendermint.restore(
                self.set_at(committed + 1), node.key, lambda kind, payload, k=node.key: fake_sign(k, kind, payload),
                self.cfg.timeouts, records,
            )
            node.up = True
            if committed < self.cfg.heights:
                self._perform(node.idx, node.machine.step(StartHeight(committed + 1)))

    def run(self) -> SimResult:
        cfg = self.cfg
        for node in self.nodes:
            assert node.machine is not None
            self._perform(node.idx, node.machine.step(StartHeight(1)))
        deadline = self.gst + cfg.heights * cfg.liveness_ms_per_height
        events = 0
        while self.queue and events < cfg.max_events:
            at, _, idx, item = heapq.heappop(self.queue)
            if at > deadline:
                break
            self.now = at
            events += 1
            if idx < 0:
                self._control(item)  # type: ignore[arg-type]
            else:
                self._deliver(idx, item)
            if self.done == self.honest_count and self.now >= self.last_fault_ms:
                if all(n.up for n in self.nodes):
                    break
        return self._check(events)

    def _check(self, events: int) -> SimResult:
        cfg = self.cfg
        safety, liveness, certs = list(self.double_signs), [], []
        honest = [n for n in self.nodes if n.honest]
        decided: dict[int, tuple[bytes, int]] = {}
        bodies: dict[int, tuple[Block, int]] = {}
        for n in honest:
            for h, bh in n.commits.items():
                if h in decided and decided[h][0] != bh:
                    safety.append(f"height {h}: node {decided[h][1]} and node {n.idx} committed different blocks")
                decided.setdefault(h, (bh, n.idx))
            for h, (block, cert) in n.blocks.items():
                if not self._cert_ok(block, cert):
                    certs.append(f"node {n.idx} height {h}: certificate does not verify")
                if block.header.app_hash == BAD_APP_HASH:
                    safety.append(f"height {h}: node {n.idx} committed a block its application judges invalid")
                first = bodies.setdefault(h, (block, n.idx))
                b0 = first[0]
                if b0 is not block and (b0.updates != block.updates or b0.evidence != block.evidence
                                        or b0.last_commit != block.last_commit):
                    safety.append(f"height {h}: node {first[1]} and node {n.idx} committed one header with two bodies")
            if len(n.commits) < cfg.heights:
                liveness.append(f"node {n.idx} committed {len(n.commits)} of {cfg.heights} heights")
        max_round = max((c.round for n in honest for _, c in n.blocks.values()), default=0)
        decision_round: dict[int, int] = {}
        for n in honest:
            for h, (_, c) in n.blocks.items():
                decision_round[h] = min(decision_round.get(h, c.round), c.round)
        return SimResult(
            seed=cfg.seed,
            heights_committed=min((len(n.commits) for n in honest), default=0),
            node_heights=sum(len(n.commits) for n in honest),
            max_round=max_round,
            messages=self.messages,
            safety_violations=safety,
            liveness_failures=liveness,
            certificate_failures=certs,
            virtual_ms=self.now,
            events=events,
            rounds=sum(r + 1 for r in decision_round.values()),
            decided_heights=len(decision_round),
            crashes=self.crashes,
            torn_records=self.torn_records,
            decode_rejections=self.decode_rejections,
            invalid_answers=self.invalid_answers,
            late_answers=self.late_answers,
            flood_messages=self.flood_messages,
            max_future=self.max_future,
            max_rounds_stored=self.max_rounds_stored,
            max_round_ahead=self.max_round_ahead,
            max_votes_per_round=self.max_votes_per_round,
            memory_failures=self.memory_failures[:5],
            set_changes=len(self.schedule) - 1,
        )

    def _cert_ok(self, block: Block, cert: CommitCertificate) -> bool:
        if cert.block_hash != block.hash() or cert.height != block.height:
            return False
        power = 0
        seen = set()
        for v, sig in cert.signatures:
            vs = self.set_at(cert.height)  # the set of that height: a stale set must not certify a block
            if v in seen or vs.power(v) == 0:
                return False
            seen.add(v)
            vote = Vote(VoteType.PRECOMMIT, cert.height, cert.round, cert.block_hash, v, sig)
            if not fake_verify(v, Vote.KIND, vote.sign_payload(), sig):
                return False
            power += vs.power(v)
        return power >= self.set_at(cert.height).quorum()


def _verify_message(msg: Proposal | Vote) -> bool:
    if type(msg) is Vote:
        return fake_verify(msg.validator, Vote.KIND, msg.sign_payload(), msg.signature)
    assert isinstance(msg, Proposal)
    return fake_verify(msg.proposer, Proposal.KIND, msg.sign_payload(), msg.signature)


def run_simulation(cfg: SimConfig) -> SimResult:
    return Simulation(cfg).run()


@dataclass
class Summary:
    runs: int = 0
    heights_committed: int = 0
    node_heights: int = 0
    max_round: int = 0
    rounds: int = 0
    decided_heights: int = 0
    messages: int = 0
    crashes: int = 0
    torn_records: int = 0
    safety_violations: int = 0
    liveness_failures: int = 0
    certificate_failures: int = 0
    memory_failures: int = 0
    decode_rejections: int = 0
    invalid_answers: int = 0
    late_answers: int = 0
    flood_messages: int = 0
    max_future: int = 0
    max_rounds_stored: int = 0
    max_round_ahead: int = 0
    max_votes_per_round: int = 0
    failing_seeds: list[int] = field(default_factory=list)
    first_problem: str = ""

    @property
    def ok(self) -> bool:
        return not (self.safety_violations or self.liveness_failures or self.certificate_failures
                    or self.memory_failures)


def run_many(cfg: SimConfig, seeds: range | list[int]) -> Summary:
    s = Summary()
    for seed in seeds:
        r = run_simulation(replace(cfg, seed=seed))
        s.runs += 1
        s.heights_committed += r.heights_committed
        s.node_heights += r.node_heights
        s.max_round = max(s.max_round, r.max_round)
        s.messages += r.messages
        s.rounds += r.rounds
        s.decided_heights += r.decided_heights
        s.crashes += r.crashes
        s.torn_records += r.torn_records
        s.safety_violations += len(r.safety_violations)
        s.liveness_failures += len(r.liveness_failures)
        s.certificate_failures += len(r.certificate_failures)
        s.memory_failures += len(r.memory_failures)
        s.decode_rejections += r.decode_rejections
        s.invalid_answers += r.invalid_answers
        s.late_answers += r.late_answers
        s.flood_messages += r.flood_messages
        s.max_future = max(s.max_future, r.max_future)
        s.max_rounds_stored = max(s.max_rounds_stored, r.max_rounds_stored)
        s.max_round_ahead = max(s.max_round_ahead, r.max_round_ahead)
        s.max_votes_per_round = max(s.max_votes_per_round, r.max_votes_per_round)
        if not r.ok:
            s.failing_seeds.append(seed)
            if not s.first_problem:
                s.first_problem = f"seed {seed}: " + "; ".join(
                    (r.safety_violations + r.liveness_failures + r.certificate_failures + r.memory_failures)[:2]
                )
    return s
