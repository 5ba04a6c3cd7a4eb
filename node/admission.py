"""The admission gate: every message from the network passes here before anything acts on it or relays it.

Cheap checks run first (size, per-peer budget, decode, topic, height and round window, right proposer, member),
the signature last. What passes is remembered in a byte-bounded cache so that the libp2p validator and the
inbound loop decode and verify a message once. Every rejection is counted by reason; logging is rate-limited.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from flnode.consensus import ValidatorSet
from flnode.protocol.errors import ProtocolError
from flnode.protocol.hashing import digest
from flnode.protocol.membership import MembershipTx
from flnode.protocol.messages import (
    DuplicateVoteEvidence,
    Message,
    Proposal,
    UpdateAnnouncement,
    UpdateBundle,
    Vote,
    decode_gossip,
)

from .metrics import Metrics
from .pool import HEIGHT_WINDOW

log = logging.getLogger("flnode.admission")

ROUND_WINDOW = 16  # proposals and votes more than this many rounds ahead of ours are not admitted
PROPOSALS_PER_ROUND = 2  # an equivocating proposer's second block is evidence; a third is noise
CACHE_BYTES = 64 << 20


class ChainView(Protocol):
    """What the gate needs to know about the node's position (node/chain_view.py)."""

    def next_height(self) -> int: ...

    def consensus_round(self) -> int: ...

    def validator_set(self, height: int) -> ValidatorSet | None: ...

    def announcement_problem(self, ann: UpdateAnnouncement) -> str | None:
        """Why `ann` is refused, or None. For the next height (the one being decided) this includes the
        signature; for the one after, only what can be checked before that height's base model is known."""
        ...


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, amount: float, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


@dataclass
class PeerBudget:
    """Per-peer limits: messages and bytes per second, with a burst of a few seconds' worth."""

    msgs_per_s: float = 500.0
    bytes_per_s: float = 16 << 20
    burst_s: float = 4.0
    _msgs: dict[str, TokenBucket] = field(default_factory=dict)
    _bytes: dict[str, TokenBucket] = field(default_factory=dict)

    def allow(self, peer: str, size: int, now: float) -> bool:
        if len(self._msgs) > 4096:  # a churn of peer ids must not grow this without bound
            self._msgs.clear()
            self._bytes.clear()
        m = self._msgs.setdefault(peer, TokenBucket(self.msgs_per_s, self.msgs_per_s * self.burst_s))
        b = self._bytes.setdefault(peer, TokenBucket(self.bytes_per_s, self.bytes_per_s * self.burst_s))
        return m.take(1, now) and b.take(size, now)


class ByteLRU:
    """An LRU map from message hash to decoded message, bounded by the encoded bytes it stands for."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, tuple[Message, int]] = OrderedDict()

    def get(self, key: bytes) -> Message | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: bytes, msg: Message, size: int) -> None:
        if key in self._items:
            return
        self._items[key] = (msg, size)
        self.bytes += size
        while self.bytes > self.max_bytes and self._items:
            _, (_, s) = self._items.popitem(last=False)
            self.bytes -= s

    def __len__(self) -> int:
        return len(self._items)


class RateLimitedLog:
    """At most `per_window` lines per reason per window; the rest only counted."""

    def __init__(self, window_s: float = 10.0, per_window: int = 5) -> None:
        self.window_s, self.per_window = window_s, per_window
        self._seen: dict[str, tuple[float, int]] = {}

    def should_log(self, reason: str, now: float) -> bool:
        start, n = self._seen.get(reason, (now, 0))
        if now - start > self.window_s:
            start, n = now, 0
        self._seen[reason] = (start, n + 1)
        return n < self.per_window


# Updates are admitted as far ahead as the update pool keeps them (two heights past the next): a validator that fell
# two heights behind still holds the updates of the height its sync brings it to, and validates that height's block
# without fetching every one of them while the network moves on without it.
UPDATES_AHEAD = HEIGHT_WINDOW - 1


class AdmissionGate:
    def __init__(
        self,
        chain_id: str,
        consensus_topic: str,
        updates_topic: str,
        view: ChainView,
        metrics: Metrics,
        clock: Callable[[], float],
        *,
        max_bytes: dict[str, int],
        budget: PeerBudget | None = None,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.chain_id = chain_id
        self.consensus_topic, self.updates_topic = consensus_topic, updates_topic
        self.view = view
        self.metrics = metrics
        self.clock = clock
        self.max_bytes = max_bytes
        self.budget = budget or PeerBudget()
        self.cache = ByteLRU(cache_bytes)
        self._log = RateLimitedLog()
        self.last_reason: str | None = None  # why the last call to admit() refused
        self.last_refused: Message | None = None  # and the message it refused, if it decoded
        # first admitted message per slot: one update per (author, height), two proposals per (height, round)
        self._update_slots: dict[tuple[bytes, int], bytes] = {}
        self._proposal_slots: dict[tuple[int, int], set[bytes]] = {}

    def admit(self, topic: str | None, data: bytes, peer: str | None) -> Message | None:
        """The decoded message if it may be acted upon and relayed, else None (rejection counted). `topic` None
        means a direct validator stream, which carries consensus messages and update announcements alike."""
        self.last_refused = None
        h = digest(data)
        cached = self.cache.get(h)
        if cached is not None:
            return cached
        cap = max(self.max_bytes.values()) if topic is None else self.max_bytes.get(topic)
        if cap is None:
            self._reject("unknown_topic", str(topic), peer)
            return None
        if len(data) > cap:
            self._reject("oversize", f"{len(data)} bytes on {topic}", peer)
            return None
        if peer is not None and not self.budget.allow(peer, len(data), self.clock()):
            self._reject("peer_budget", peer[:16], peer)
            return None
        try:
            msg = decode_gossip(data)
        except ProtocolError as exc:
            self._reject("malformed", str(exc), peer)
            return None
        if topic is None:
            updates = isinstance(msg, UpdateAnnouncement | UpdateBundle)
            topic = self.updates_topic if updates else self.consensus_topic
        reason = self._check(topic, msg)
        if reason is not None:
            self._reject(reason, type(msg).__name__, peer)
            self.last_refused = msg
            return None
        self.cache.put(h, msg, len(data))
        self.metrics.set("admission_cache_bytes", self.cache.bytes)
        return msg

    def prune(self, below_height: int) -> None:
        """Forget slots of heights that are decided."""
        self._update_slots = {k: v for k, v in self._update_slots.items() if k[1] >= below_height}
        self._proposal_slots = {k: v for k, v in self._proposal_slots.items() if k[0] >= below_height}

    # ------------------------------------------------------------------ checks

    def _check(self, topic: str, msg: Message) -> str | None:
        current = self.view.next_height()
        if isinstance(msg, Vote):
            if topic != self.consensus_topic:
                return "wrong_topic"
            if msg.height > current + 1:
                return "ahead_height"
            if msg.height < current - 1:
                return "stale_height"
            if msg.height == current and msg.round > self.view.consensus_round() + ROUND_WINDOW:
                return "round_too_far"
            if msg.height == current + 1 and msg.round > ROUND_WINDOW:
                return "round_too_far"
            vs = self.view.validator_set(msg.height)
            if vs is None or vs.power(msg.validator) == 0:
                return "not_validator"
            return None if msg.verify(self.chain_id) else "bad_signature"
        if isinstance(msg, Proposal):
            if topic != self.consensus_topic:
                return "wrong_topic"
            if msg.height > current + 1:
                return "ahead_height"
            if msg.height < current:
                return "stale_height"
            limit = (self.view.consensus_round() if msg.height == current else 0) + ROUND_WINDOW
            if msg.round > limit:
                return "round_too_far"
            vs = self.view.validator_set(msg.height)
            if vs is None or vs.proposer(msg.height, msg.round) != msg.proposer:
                return "wrong_proposer"
            slot = self._proposal_slots.setdefault((msg.height, msg.round), set())
            if msg.block_hash not in slot and len(slot) >= PROPOSALS_PER_ROUND:
                return "proposal_flood"
            if not msg.verify(self.chain_id):
                return "bad_signature"
            slot.add(msg.block_hash)
            return None
        if isinstance(msg, DuplicateVoteEvidence):
            if topic != self.consensus_topic:
                return "wrong_topic"
            if msg.vote_a.height > current:
                return "stale_height"
            vs = self.view.validator_set(msg.vote_a.height)
            if vs is None or vs.power(msg.validator) == 0:
                return "not_validator"
            try:
                msg.check(self.chain_id)
            except ProtocolError:
                return "bad_evidence"
            return None
        if isinstance(msg, MembershipTx):  # membership: on gossip or a direct link, the block's rules
            problem = getattr(self.view, "membership_problem", None)
            return "unexpected_type" if problem is None else problem(msg)
        if isinstance(msg, UpdateBundle):
            msg = msg.announcement
        if isinstance(msg, UpdateAnnouncement):
            if topic != self.updates_topic:
                return "wrong_topic"
            if msg.height > current + UPDATES_AHEAD:
                return "ahead_height"
            if msg.height < current:
                return "stale_height"
            problem = self.view.announcement_problem(msg)
            if problem is not None:
                return problem
            first = self._update_slots.get((msg.author, msg.height))
            if first is not None and first != msg.hash():
                return "second_update"
            if msg.height != current and not msg.verify(self.chain_id):  # the view checked the next height's
                return "bad_signature"
            self._update_slots[(msg.author, msg.height)] = msg.hash()
            return None
        return "unexpected_type"

    def _reject(self, reason: str, detail: str, peer: str | None) -> None:
        self.last_reason = reason
        self.metrics.inc(f"rejected_{reason}")
        if self._log.should_log(reason, self.clock()):
            log.info("rejected message", extra={"reason": reason, "detail": detail[:120], "peer": (peer or "")[:16]})
