"""The blob service: update and model blobs by content hash, fetched from holders and served to peers.

Fetches race a few holders with staggered starts (likeliest holder first), timeouts scaled to the blob's size. A
response streams into a temporary file, hashed as it is written (one pass, never the whole blob in memory); data
that does not hash to what was asked for is refused and its file removed. One fetch per hash runs at a time;
others wait for it. Existence is answered from memory or a file's existence, never by reading a blob. Serving
streams from the file in pieces; readers() hands validation and aggregation the files, read a chunk at a time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence

import trio
from flnode.protocol.hashing import short
from flnode.protocol.messages import BlobRequest
from flnode.protocol.tensors import BlobReader, BytesReader

from .chain.blob_files import BlobSink, BlobWriteError
from .metrics import Metrics
from .net import NetError, P2PNode, StreamedResponse
from .store_worker import StoreWorker

log = logging.getLogger("flnode.blobs")

BLOB_PROTOCOL = "/flnode/blob/1.0.0"
MIN_TIMEOUT_S = 5.0
ASSUMED_BYTES_PER_S = 8 << 20  # a slow but working stream: the stagger before asking another holder
SLOWEST_BYTES_PER_S = 1 << 20  # a transfer may take this long in total while it keeps moving...
IDLE_TIMEOUT_S = 10.0  # ...and no more than this between two pieces
PARALLEL = 3
SERVE_PIECE = 1 << 20  # read from the file and written to the stream at a time
FLUSH_BYTES = 4 << 20  # received bytes gathered before one thread hop hashes and writes them
BATCH_PUT_BYTES = 64 << 10  # smaller blobs are written in batches, one thread hop for all that arrived meanwhile


def fetch_timeout(size: int) -> float:
    return MIN_TIMEOUT_S + size / ASSUMED_BYTES_PER_S


def transfer_timeout(size: int) -> float:
    """The total time a transfer that keeps making progress may take (serving and fetching). Measured: with 4
    nodes on 2 busy cores, 12 concurrent 40 MB transfers ran at ~4 MB/s each; a tight total timeout cut them all
    off and the retries from scratch doubled the load."""
    return MIN_TIMEOUT_S + size / SLOWEST_BYTES_PER_S


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
        # Small received blobs, not yet in their files: a height's n updates arrive within milliseconds, and one
        # thread hop each cost more CPU than the writes (16 nodes). flush() writes them all in one hop; a commit
        # flushes first, so nothing a block names is only in memory once the height is stored.
        self._unwritten: dict[bytes, tuple[bytes, int | None]] = {}
        self._flush_wanted = trio.Event()
        self._flush_lock = trio.Lock()
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

    async def run_flusher(self) -> None:
        """Write small blobs in batches as they arrive (a background task of the node)."""
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Every small blob put so far is in its file when this returns (or was refused by the disk: logged,
        counted and no longer held, so it is fetched again if needed)."""
        async with self._flush_lock:
            if not self._unwritten:
                return
            batch = dict(self._unwritten)
            worker = self.worker

            def write_all() -> BlobWriteError | None:
                for h, (data, height) in batch.items():
                    try:
                        worker.store.blobs.put(h, data, height)
                    except BlobWriteError as exc:
                        return exc
                return None

            with trio.CancelScope(shield=True):  # a started batch is finished, and forgotten only then
                failed = await worker.run(write_all, limiter=worker.blob_limiter)
            for h in batch:
                self._unwritten.pop(h, None)
            if failed is not None:
                self._write_failed(failed)
                self.forget([h for h in batch if not worker.store.blobs.exists(h)])

    def _remember(self, h: bytes, data: bytes) -> None:
        if len(data) > self.cache_bytes // 4 or h in self._recent:
            return
        self._recent[h] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > self.cache_bytes:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)

    def _in_memory(self, h: bytes) -> bytes | None:
        d = self._recent.get(h)
        if d is None and h in self._unwritten:
            d = self._unwritten[h][0]
        return d

    async def get(self, h: bytes) -> bytes | None:
        return (await self.get_many([h])).get(h)

    async def get_many(self, hashes: Sequence[bytes]) -> dict[bytes, bytes]:
        """The blobs we hold among `hashes`: from memory, the rest in one store call."""
        out = {h: d for h in hashes if (d := self._in_memory(h)) is not None}
        rest = [h for h in hashes if h not in out]
        if rest:
            read = await self.worker.get_blobs(rest)
            for h, d in read.items():
                self._remember(h, d)
            out.update(read)
        return out

    async def readers(self, hashes: Sequence[bytes]) -> dict[bytes, BlobReader]:
        """The blobs we hold among `hashes`, for chunked reading: from memory, the rest as open files."""
        out: dict[bytes, BlobReader] = {h: BytesReader(d) for h in hashes if (d := self._in_memory(h)) is not None}
        rest = [h for h in hashes if h not in out]
        if rest:
            out.update(await self.worker.blob_readers(rest))
        return out

    def _write_failed(self, exc: BlobWriteError) -> None:
        self.metrics.inc("blob_write_failures")
        now = trio.current_time()
        if now - self._last_write_error > 60:
            self._last_write_error = now
            log.error("cannot store blobs", extra={"error": str(exc)[:200]})

    async def put(self, h: bytes, data: bytes, height: int | None = None) -> bool:
        """Store a blob (for the update of `height`, which decides when it may be pruned). False when the disk
        refused it: fetching stops being useful, consensus goes on (the error is logged and counted once a minute)."""
        if h in self._held:
            return True
        if len(data) <= BATCH_PUT_BYTES:
            self._unwritten[h] = (data, height)  # held in memory until the flusher's next batch
            self._flush_wanted.set()
        else:
            try:
                await self.worker.put_blob(h, data, height)
            except BlobWriteError as exc:
                self._write_failed(exc)
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

    async def serve(self, peer: str, request: bytes) -> bytes | StreamedResponse:
        """A blob for a peer: small or cached ones whole, large ones streamed from the file in pieces."""
        req = BlobRequest.decode(request)
        cached = self._in_memory(req.blob_hash)
        if cached is not None:
            return cached
        reader = (await self.worker.blob_readers([req.blob_hash])).get(req.blob_hash)
        if reader is None:
            return b""
        if reader.size <= SERVE_PIECE:
            return await self.worker.read_at(reader, 0, reader.size)
        worker = self.worker

        async def pieces() -> AsyncIterator[bytes]:
            for at in range(0, reader.size, SERVE_PIECE):
                yield await worker.read_at(reader, at, min(SERVE_PIECE, reader.size - at))
            self.metrics.inc("blobs_served_streamed")

        return StreamedResponse(reader.size, pieces, transfer_timeout(reader.size))

    async def fetch(self, h: bytes, holders: Sequence[str], size: int, height: int | None = None) -> bool:
        """One attempt over `holders` (in order of preference); True once the blob is stored here."""
        if await self.has(h):
            return True
        running = self._fetching.get(h)
        if running is not None:
            await running.wait()
            return h in self._held
        done = self._fetching[h] = trio.Event()
        t0 = trio.current_time()
        try:
            if not await self._race(h, [p for p in holders if p != self.net.peer_id], size, height):
                return False
            self._held.add(h)
            self.metrics.inc("blobs_fetched")
            log.debug("blob fetched", extra={"blob": short(h), "size": size, "s": round(trio.current_time() - t0, 4)})
            self.on_stored(h)
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

    async def _race(self, h: bytes, peers: list[str], size: int, height: int | None) -> bool:
        """Ask a few holders (staggered); each response streams into its own temporary file, hashed as written.
        The first whole, matching one is renamed into place (True) and the others are cancelled and removed.
        Another holder is asked only while no transfer is moving: hedging against a silent peer, never adding a
        second copy of a transfer that is merely slow (that only shares the same CPU and link once more)."""
        stagger = min(2.0, fetch_timeout(size) / 4)
        stored: list[bool] = []
        last_progress = [-1e9]

        async def attempt(peer: str, delay: float, cancel: trio.CancelScope) -> None:
            await trio.sleep(delay)
            if delay:
                while trio.current_time() - last_progress[0] < stagger:
                    await trio.sleep(stagger)
            sink: BlobSink = self.worker.blob_sink(h)
            buf = bytearray()

            async def piece(data: bytes) -> None:
                last_progress[0] = trio.current_time()
                buf.extend(data)
                if len(buf) >= FLUSH_BYTES:
                    chunk = bytes(buf)
                    buf.clear()
                    await self.worker.sink_write(sink, chunk)

            try:
                got = await self.net.request_into(
                    peer, BLOB_PROTOCOL, BlobRequest(h).encode(), piece, max_response=self.max_blob_bytes,
                    timeout=transfer_timeout(size), idle_timeout=IDLE_TIMEOUT_S)
                if not got:
                    return
                if buf:
                    await self.worker.sink_write(sink, bytes(buf))
                    buf.clear()
                if stored:
                    return
                if not await self.worker.sink_commit(sink, height):
                    self.metrics.inc("rejected_blob_hash_mismatch")
                    log.info("peer sent a blob that does not match its hash", extra={"peer": peer[:16]})
                    return
                stored.append(True)
                cancel.cancel()
            except NetError as exc:
                log.debug("blob fetch failed", extra={"peer": peer[:16], "error": str(exc)[:120]})
            except BlobWriteError as exc:
                self._write_failed(exc)
                cancel.cancel()
            finally:
                await self.worker.sink_abort(sink)  # a no-op once committed (the temporary name is gone)

        async with trio.open_nursery() as n:
            for i, peer in enumerate(peers[: PARALLEL * 2]):
                n.start_soon(attempt, peer, (i if i < PARALLEL else i + PARALLEL) * stagger, n.cancel_scope)
        return bool(stored)
