"""Per-peer flow bookkeeping of the consensus transport, sans-I/O (every call takes `now`): which frames were
seen, each peer's bounded send queue, its inbound message and byte budget, and the frame decoder."""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .frames import FRAME_HEADER, NetError


def frame_id(data: bytes) -> bytes:
    """A short key for "this frame was seen" (not a content address: those are protocol.hashing.digest)."""
    return hashlib.blake2b(data, digest_size=16).digest()


class FrameTooBig(NetError):
    pass


class SeenSet:
    """Recently seen hashes: at most `max_entries`, each forgotten `ttl` seconds after it was added."""

    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._at: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._at)

    def seen(self, h: bytes, now: float) -> bool:
        t = self._at.get(h)
        if t is None:
            return False
        if now - t >= self.ttl:
            del self._at[h]
            return False
        return True

    def add(self, h: bytes, now: float) -> None:
        self._at[h] = now
        self._at.move_to_end(h)
        while len(self._at) > self.max_entries:
            self._at.popitem(last=False)

    def discard(self, h: bytes) -> None:
        self._at.pop(h, None)


@dataclass
class PushResult:
    queued: bool = False
    duplicate: bool = False
    dropped: int = 0


@dataclass
class PeerQueue:
    """Outbound messages for one peer on one connection: FIFO, at most `max_bytes` queued.

    Over the bound the lowest (height, round) goes first, oldest first within it: a stale round is the
    least useful thing to deliver late. Identical bytes are queued once per `resend_after` seconds; a
    dropped message is forgotten so a later rebroadcast of it goes through.
    """

    max_bytes: int
    resend_after: float
    max_seen: int = 8192
    nbytes: int = 0
    _items: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # seq -> (hash, data), FIFO
    _order: list[tuple[int, int, int]] = field(default_factory=list)  # heap of (height, round, seq)
    _seq: int = 0
    _sent: SeenSet = field(init=False)

    def __post_init__(self) -> None:
        self._sent = SeenSet(self.max_seen, self.resend_after)

    def __len__(self) -> int:
        return len(self._items)

    def push(self, data: bytes, h: bytes, height: int, round: int, now: float) -> PushResult:
        if self._sent.seen(h, now):
            return PushResult(duplicate=True)
        self._seq += 1
        self._items[self._seq] = (h, data)
        heapq.heappush(self._order, (height, round, self._seq))
        self._sent.add(h, now)
        self.nbytes += len(data)
        result = PushResult(queued=True)
        while self.nbytes > self.max_bytes and self._order:
            _, _, seq = heapq.heappop(self._order)
            item = self._items.pop(seq, None)
            if item is None:
                continue  # already taken by the writer
            self.nbytes -= len(item[1])
            self._sent.discard(item[0])
            result.dropped += 1
            if seq == self._seq:
                result.queued = False
        return result

    def mark_sent(self, h: bytes, now: float) -> None:
        """The peer already has `h` (it sent it to us)."""
        self._sent.add(h, now)

    def take_all(self) -> list[bytes]:
        out = [data for _, data in self._items.values()]
        self._items.clear()
        self._order.clear()
        self.nbytes = 0
        return out


@dataclass
class RateBudget:
    """Token buckets for inbound messages and bytes per second, each holding one second's worth."""

    msgs_per_s: float
    bytes_per_s: float
    _msgs: float = -1.0
    _bytes: float = -1.0
    _at: float | None = None

    def spend(self, nbytes: int, now: float) -> bool:
        if self._at is None:
            self._msgs, self._bytes = self.msgs_per_s, self.bytes_per_s
        else:
            dt = max(0.0, now - self._at)
            self._msgs = min(self.msgs_per_s, self._msgs + dt * self.msgs_per_s)
            self._bytes = min(self.bytes_per_s, self._bytes + dt * self.bytes_per_s)
        self._at = now
        self._msgs -= 1
        self._bytes -= nbytes
        return self._msgs >= 0 and self._bytes >= 0


class FrameDecoder:
    """Splits a byte stream into length-prefixed frames (host.write_frame's format); refuses big ones early."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        pos = 0
        while len(self._buf) - pos >= FRAME_HEADER:
            size = int.from_bytes(self._buf[pos : pos + FRAME_HEADER], "big")
            if size > self.max_frame:
                raise FrameTooBig(f"frame of {size} bytes exceeds the cap of {self.max_frame}")
            end = pos + FRAME_HEADER + size
            if len(self._buf) < end:
                break
            frames.append(bytes(self._buf[pos + FRAME_HEADER : end]))
            pos = end
        del self._buf[:pos]
        return frames


def listener_slot_free(peer: str, held: set[str], is_member: Callable[[str], bool], member_slots: int,
                       outsider_slots: int) -> bool:
    """Whether a non-validator may take a listening slot: members (trainers, admitted nodes) and outsiders each
    have their own few, so outsiders cannot take them all; a peer holds at most one."""
    member = is_member(peer)
    same = sum(1 for p in held if is_member(p) == member)
    return peer not in held and same < (member_slots if member else outsider_slots)
