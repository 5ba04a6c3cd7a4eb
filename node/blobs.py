"""The blob service: update and model blobs by content hash, fetched from holders and served to peers.

Fetches race a few holders with staggered starts (the most likely holder first), with timeouts scaled to the
blob's size. Data that does not hash to what was asked for is refused. One fetch per hash runs at a time; other
callers wait for it. Existence is answered from memory where possible, otherwise by an index lookup, never by
reading a blob.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import trio
from flnode.protocol.hashing import digest, short
from flnode.protocol.messages import BlobRequest

from .chain.store import BlobWriteError
from .metrics import Metrics
from .net import NetError, P2PNode
from .store_worker import StoreWorker

log = logging.getLogger("flnode.blobs")

BLOB_PROTOCOL = "/flnode/blob/1.0.0"
MIN_TIMEOUT_S = 5.0
ASSUMED_BYTES_PER_S = 8 << 20  # a slow but working stream: timeouts are generous, never tight
PARALLEL = 3
HASH_IN_THREAD = 1 << 20


def fetch_timeout(size: int) -> float:
    return MIN_TIMEOUT_S + size / ASSUMED_BYTES_PER_S


class BlobService:
    def __init__(
        self, net: P2PNode, worker: StoreWorker, metrics: Metrics, *, max_blob_bytes: int, cache_bytes: int = 64 << 20
    ) -> None:
        self.net = net
        self.worker = worker
        self.metrics = metrics
        self.max_blob_bytes = max_blob_bytes
        self._held: set[bytes] = set()
        # the latest blobs in memory (bounded in bytes): a height's updates are read again at validation, building
        # and execution, and each disk read is a thread hop that costs more than the read on a busy machine
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()
        self._recent_bytes = 0
        self.cache_bytes = cache_bytes
        self._fetching: dict[bytes, trio.Event] = {}
        self.on_stored: Callable[[bytes], None] = lambda h: None
        self._last_write_error = -1e9

    def holds(self, h: bytes) -> bool:
        """Known to be stored (no I/O). False means 'not known', not 'absent'."""
        return h in self._held

    async def has(self, h: bytes) -> bool:
        if h in self._held:
            return True
        if await self.worker.has_blob(h):
            self._held.add(h)
            return True
        return False

    def _remember(self, h: bytes, data: bytes) -> None:
        if len(data) > self.cache_bytes // 4 or h in self._recent:
            return
        self._recent[h] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > self.cache_bytes:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)

    async def get(self, h: bytes) -> bytes | None:
        return (await self.get_many([h])).get(h)

    async def get_many(self, hashes: Sequence[bytes]) -> dict[bytes, bytes]:
        """The blobs we hold among `hashes`: from memory, the rest in one store call."""
        out = {h: d for h in hashes if (d := self._recent.get(h)) is not None}
        rest = [h for h in hashes if h not in out]
        if rest:
            read = await self.worker.get_blobs(rest)
            for h, d in read.items():
                self._remember(h, d)
            out.update(read)
        return out

    async def put(self, h: bytes, data: bytes, height: int | None = None) -> bool:
        """Store a blob (for the update of `height`, which decides when it may be pruned). False when the disk
        refused it: fetching stops being useful, consensus goes on (the error is logged and counted once a minute)."""
        if h in self._held:
            return True
        try:
            await self.worker.put_blob(h, data, height)
        except BlobWriteError as exc:
            self.metrics.inc("blob_write_failures")
            now = trio.current_time()
            if now - self._last_write_error > 60:
                self._last_write_error = now
                log.error("cannot store blobs", extra={"error": str(exc)[:200]})
            return False
        self._held.add(h)
        self._remember(h, data)
        self.on_stored(h)
        return True

    def forget(self, hashes: Sequence[bytes]) -> None:
        self._held.difference_update(hashes)
        for h in hashes:
            data = self._recent.pop(h, None)
            if data is not None:
                self._recent_bytes -= len(data)

    async def serve(self, peer: str, request: bytes) -> bytes:
        req = BlobRequest.decode(request)
        return await self.get(req.blob_hash) or b""

    async def fetch(self, h: bytes, holders: Sequence[str], size: int, height: int | None = None) -> bool:
        """One attempt over `holders` (in order of preference); True once the blob is stored here."""
        if await self.has(h):
            return True
        running = self._fetching.get(h)
        if running is not None:
            await running.wait()
            return h in self._held
        done = self._fetching[h] = trio.Event()
        try:
            data = await self._race(h, [p for p in holders if p != self.net.peer_id], size)
            if data is None:
                return False
            if not await self.put(h, data, height):
                return False
            self.metrics.inc("blobs_fetched")
            return True
        finally:
            del self._fetching[h]
            done.set()

    async def fetch_until(
        self, h: bytes, holders: Callable[[], Sequence[str]], size: int, give_up: Callable[[], bool],
        height: int | None = None,
    ) -> bool:
        """Keep trying (with back-off) until stored, or until `give_up()` says the blob is no longer needed."""
        attempt = 0
        while not give_up():
            if await self.fetch(h, holders(), size, height):
                return True
            attempt += 1
            if attempt == 3:
                log.warning("blob not available yet; still trying", extra={"blob": short(h)})
            self.metrics.inc("blob_fetch_retries")
            await trio.sleep(min(5.0, 0.2 * 2**attempt))
        return False

    async def _race(self, h: bytes, peers: list[str], size: int) -> bytes | None:
        timeout = fetch_timeout(size)
        stagger = min(2.0, timeout / 4)
        found: list[bytes] = []

        async def attempt(peer: str, delay: float, cancel: trio.CancelScope) -> None:
            await trio.sleep(delay)
            try:
                data = await self.net.request(
                    peer, BLOB_PROTOCOL, BlobRequest(h).encode(), max_response=self.max_blob_bytes, timeout=timeout
                )
            except NetError as exc:
                log.debug("blob fetch failed", extra={"peer": peer[:16], "error": str(exc)[:120]})
                return
            if not data:
                return
            actual = await trio.to_thread.run_sync(digest, data) if len(data) > HASH_IN_THREAD else digest(data)
            if actual != h:
                self.metrics.inc("rejected_blob_hash_mismatch")
                log.info("peer sent a blob that does not match its hash", extra={"peer": peer[:16]})
                return
            if not found:
                found.append(data)
                cancel.cancel()

        async with trio.open_nursery() as n:
            for i, peer in enumerate(peers[: PARALLEL * 2]):
                n.start_soon(attempt, peer, (i if i < PARALLEL else i + PARALLEL) * stagger, n.cancel_scope)
        return found[0] if found else None
