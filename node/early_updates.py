"""Update announcements that arrived before their height came within the admission gate's window.

A validator link sends each frame once, so an update its author sent while this node was three or more heights
behind (syncing after a stall) never came again: the node caught up holding no update of its next height, proposed
an empty block when its turn came (which the others refuse as unfair) and fetched every block's blobs late, so it
stayed behind. CometBFT's mempool reactor waits for a peer to catch up before sending; here the receiver keeps the
frames instead and offers them to the gate again after each commit. Sans-I/O and bounded: per sender, in total
bytes, and in how far ahead; the oldest go first.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_AHEAD = 32  # heights past the next: further than this, a sync is under way and the blocks bring the blobs
MAX_PER_PEER = 96
MAX_BYTES = 16 << 20


class EarlyUpdates:
    def __init__(self, max_ahead: int = MAX_AHEAD, max_per_peer: int = MAX_PER_PEER,
                 max_bytes: int = MAX_BYTES) -> None:
        self.max_ahead, self.max_per_peer, self.max_bytes = max_ahead, max_per_peer, max_bytes
        self._frames: OrderedDict[bytes, tuple[str, int, bytes]] = OrderedDict()  # frame -> (peer, height, data)
        self._per_peer: dict[str, int] = {}
        self.nbytes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._frames)

    def park(self, peer: str | None, height: int, data: bytes, next_height: int) -> bool:
        """Keep a frame the gate refused as too far ahead (`height` as its message says: not yet checkable)."""
        sender = peer or ""
        if data in self._frames or not next_height < height <= next_height + self.max_ahead:
            return False
        if self._per_peer.get(sender, 0) >= self.max_per_peer or len(data) > self.max_bytes:
            self.dropped += 1
            return False
        while self.nbytes + len(data) > self.max_bytes:
            self._remove(next(iter(self._frames)))
            self.dropped += 1
        self._frames[data] = (sender, height, data)
        self._per_peer[sender] = self._per_peer.get(sender, 0) + 1
        self.nbytes += len(data)
        return True

    def due(self, next_height: int, window: int) -> list[tuple[str | None, bytes]]:
        """Frames of heights now within [next_height, next_height + window], in arrival order, and forgets them
        together with those of heights already passed."""
        out: list[tuple[str | None, bytes]] = []
        for key, (sender, height, data) in list(self._frames.items()):
            if height <= next_height + window:
                self._remove(key)
                if height >= next_height:
                    out.append((sender or None, data))
        return out

    def _remove(self, key: bytes) -> None:
        sender, _, data = self._frames.pop(key)
        self.nbytes -= len(data)
        left = self._per_peer[sender] - 1
        if left:
            self._per_peer[sender] = left
        else:
            del self._per_peer[sender]
