"""All SQLite work off the trio loop, one call at a time on a worker thread.

SQLite calls (an fsync'd commit can take tens of milliseconds) never run on the event loop. One capacity-1
limiter serialises them, so the single connection sees one caller at a time, in the order they were made.
A call that was started finishes even if its caller is cancelled: a half-done write is never abandoned.
Blob put/get/has touch only blob files (no SQLite), so they run beside it on their own threads: receiving or
serving a large blob never delays a vote's fsync'd record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio
from flnode.protocol.tensors import BlobReader

from .chain.blob_files import BlobSink
from .chain.store import ChainStore

T = TypeVar("T")
BLOB_THREADS = 4


def _fixed_mmap_threshold() -> None:
    """Blob threads allocate and free multi-megabyte buffers (pieces of large blobs). glibc raises its mmap
    threshold to the size of the first such buffer freed, after which these buffers come from per-thread heaps that
    are not given back: measured at 10M parameters, a node's RSS grew ~50 MB per height. A fixed 1 MiB threshold
    (which also turns the dynamic adjustment off) returns them to the system when freed. Linux/glibc only."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class StoreWorker:
    def __init__(self, store: ChainStore) -> None:
        _fixed_mmap_threshold()
        self.store = store
        self._limiter = trio.CapacityLimiter(1)
        self.blob_limiter = trio.CapacityLimiter(BLOB_THREADS)
        self.calls = 0
        self.busy_s = 0.0
        self.max_call_s = 0.0

    async def run(self, fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None) -> T:
        def timed() -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                dt = time.perf_counter() - t0
                self.calls += 1
                self.busy_s += dt
                self.max_call_s = max(self.max_call_s, dt)

        return await trio.to_thread.run_sync(timed, limiter=limiter or self._limiter)

    # the calls the daemon makes, typed
    async def append_record(self, height: int, data: bytes) -> None:
        await self.run(self.store.log.append, height, data)

    async def put_blob(self, h: bytes, data: bytes, height: int | None = None) -> None:
        """Raises DiskFullError (a StoreError) when the disk is full: stop fetching, keep voting."""
        await self.run(self.store.blobs.put, h, data, height, limiter=self.blob_limiter)

    async def get_blobs(self, hashes: list[bytes]) -> dict[bytes, bytes]:
        """The blobs we hold among `hashes`, in one trip to a blob thread."""
        def read() -> dict[bytes, bytes]:
            return {h: d for h in hashes if (d := self.store.blobs.get(h)) is not None}

        return await self.run(read, limiter=self.blob_limiter)

    async def blob_readers(self, hashes: list[bytes]) -> dict[bytes, BlobReader]:
        """Open the blobs we hold among `hashes` for chunked reading (no content is read here)."""
        def open_all() -> dict[bytes, BlobReader]:
            return {h: r for h in hashes if (r := self.store.blobs.reader(h)) is not None}

        return await self.run(open_all, limiter=self.blob_limiter)

    async def read_at(self, reader: BlobReader, offset: int, n: int) -> bytes:
        return bytes(await self.run(reader.read_at, offset, n, limiter=self.blob_limiter))

    def blob_sink(self, h: bytes) -> BlobSink:
        return self.store.blobs.sink(h)

    async def sink_write(self, sink: BlobSink, data: bytes) -> None:
        """Hash and write a piece of a streamed blob on a blob thread (BlobWriteError / DiskFullError)."""
        await self.run(sink.write, data, limiter=self.blob_limiter)

    async def sink_commit(self, sink: BlobSink, height: int | None) -> bool:
        """Check, fsync and rename a streamed blob, then register it; False if it does not match its hash."""
        def commit() -> bool:
            if not sink.commit():
                return False
            self.store.blobs.adopt(sink.h, sink.size, height)
            return True

        return await self.run(commit, limiter=self.blob_limiter)

    async def sink_abort(self, sink: BlobSink) -> None:
        with trio.CancelScope(shield=True):
            await self.run(sink.abort, limiter=self.blob_limiter)

    async def has_blob(self, h: bytes) -> bool:
        return await self.run(self.store.blobs.has, h, limiter=self.blob_limiter)

    async def prune_blobs(self, committed_height: int, retention: int, removed: list[bytes] | None = None) -> int:
        return await self.run(self.store.prune_blobs, committed_height, retention, removed)
