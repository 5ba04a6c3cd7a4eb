"""The blob store: the blob files (blob_files.py) and their index rows in the chain database (hash, size, height,
kind). put does no SQLite write, so receiving updates never queues behind the fsync'd consensus writes; a height's
blobs are made durable (stage_height), then indexed inside the transaction that commits the height, so an index
row always names a durable, whole file. Also: reading with hash checks, pruning, the migration of an old store's
in-database `blobs` table and, at open, recovery of files received after the last commit."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flnode.protocol.hashing import digest
from flnode.protocol.tensors import BytesReader, write_tensors

from .blob_files import BlobFiles, BlobSink, FileReader
from .db import Db, StoreError

# A row's height is the last height that needs the blob (max over references), kind 'model' wins over 'update':
# pruning by height then never drops a model blob a retained state still points at.
UPSERT_INDEX = (
    "INSERT INTO blob_index (hash, size, height, kind) VALUES (?, ?, ?, ?) ON CONFLICT(hash) DO UPDATE SET "
    "height = MAX(height, excluded.height), "
    "kind = CASE WHEN kind = 'model' OR excluded.kind = 'model' THEN 'model' ELSE 'update' END"
)
INSERT_INDEX = "INSERT OR IGNORE INTO blob_index (hash, size, height, kind) VALUES (?, ?, ?, ?)"
LEGACY_BATCH_BYTES = 64 << 20
Row = tuple[bytes, int, int, str]


@dataclass
class StagedBlobs:
    """A height's blobs, durable and ready to index (see BlobStore.stage_height)."""

    upserts: list[Row]
    inserts: list[Row]  # the genesis model of a momentum rule, then orphans: never move an existing row
    pending: dict[bytes, tuple[int, int | None]]

    def index(self, c: sqlite3.Connection) -> None:
        """Inside the height's transaction."""
        c.executemany(UPSERT_INDEX, self.upserts)
        c.executemany(INSERT_INDEX, self.inserts)


class BlobStore:
    def __init__(self, db: Db, root: Path, readonly: bool) -> None:
        self.db = db
        self.files = BlobFiles(root)
        self.readonly = readonly
        self._pending_lock = threading.Lock()
        # received since the last commit, not yet indexed: hash -> (size, height announced for, or None)
        self._pending: dict[bytes, tuple[int, int | None]] = {}
        # blob files whose content this process has hashed (written here, or checked once): readers skip the hash
        self._verified: set[bytes] = set()
        # an old store with a `blobs` table still holding rows (read-only openers; the writer migrates it)
        self.legacy = db.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'blobs'") is not None

    def put(self, h: bytes, data: bytes, height: int | None = None) -> None:
        """Store a received blob; `height`: the height it was announced for (when it may be pruned). No fsync and
        no SQLite write: the next commit makes it durable and indexes it. Safe from any thread.
        Raises DiskFullError (disk or quota full) or BlobWriteError (any other OSError)."""
        if self.readonly:
            raise StoreError("read-only store")
        if digest(data) != h:
            raise StoreError("blob does not match its hash")
        self.files.write(h, data)
        self.adopt(h, len(data), height)

    def sink(self, h: bytes) -> BlobSink:
        """Stream a blob in (one hash pass while writing); BlobSink.commit checks it, then adopt registers it."""
        if self.readonly:
            raise StoreError("read-only store")
        return self.files.sink(h)

    def adopt(self, h: bytes, size: int, height: int | None = None) -> None:
        """Register a blob a committed BlobSink put in place (already hash-checked: not hashed again)."""
        self._verified.add(h)
        with self._pending_lock:
            old = self._pending.get(h, (0, None))[1]
            self._pending[h] = (size, height if old is None else max(old, height or old))

    def reader(self, h: bytes) -> FileReader | BytesReader | None:
        """The blob for chunked reading (validation, aggregation, serving), or None. Not hashed: see FileReader."""
        r = self.files.reader(h)
        if r is not None:
            if h in self._verified:
                return r
            # a file this process did not write (from before a restart): hashed once, in pieces; a corrupt one is
            # deleted and reported missing, so it is fetched again rather than executed or served
            sha = hashlib.sha256()
            for at in range(0, r.size, 1 << 22):
                sha.update(r.read_at(at, min(1 << 22, r.size - at)))
            if sha.digest() == h:
                self._verified.add(h)
                return r
            r.close()
            self._drop_corrupt(h)
            return None
        data = self._legacy_blob(h)
        return None if data is None else BytesReader(data)

    def get(self, h: bytes) -> bytes | None:
        """The blob, hash-checked: a corrupt file is deleted (by the writer) and reported missing."""
        data = self.files.read(h)
        if data is not None:
            if digest(data) == h:
                return data
            self._drop_corrupt(h)
            return None
        return self._legacy_blob(h)

    def has(self, h: bytes) -> bool:
        """Whether a blob file exists: a stat, never a read (get checks the content)."""
        if self.files.exists(h):
            return True
        return self.legacy and self._legacy_blob(h, probe=True) is not None

    def exists(self, h: bytes) -> bool:
        """Whether the blob's file exists (a stat; no legacy row counts)."""
        return self.files.exists(h)

    def floor(self) -> int:
        """Blobs of heights below this may be pruned; the model blob of this height and all later blobs are kept
        (0: nothing was ever pruned)."""
        raw = self.db.meta("blob_floor")
        return int(raw.decode()) if raw else 0

    def _drop_corrupt(self, h: bytes) -> None:
        if not self.readonly:
            self.files.remove(h)
            with self._pending_lock:
                self._pending.pop(h, None)

    # ---------------------------------------------------------------- a height's commit

    def stage_height(self, h: int, model_hash: bytes, model_blob: bytes | Mapping[str, np.ndarray],
                     in_block: set[bytes], prev: bytes | None, prev_model: Mapping[str, np.ndarray]) -> StagedBlobs:
        """Write the model blob (and a momentum rule's genesis model `prev`, if absent), then make it, the block's
        update blobs and every blob received since the last commit durable; the rows to index them. Raises
        DiskFullError (nothing is committed) or StoreError."""
        if isinstance(model_blob, (bytes, bytearray, memoryview)):
            if digest(model_blob) != model_hash:
                raise StoreError(f"model blob of height {h} does not match the state's model hash")
            model_size = len(model_blob)
            self.files.write(model_hash, model_blob)
        elif self.files.exists(model_hash):  # an unchanged model (no updates): already on disk
            model_size = os.path.getsize(self.files.path(model_hash))
        else:
            sink = self.files.sink(model_hash)
            write_tensors(model_blob, sink.write)  # streamed to its file, never encoded in memory
            model_size = sink.size
            if not sink.commit():
                raise StoreError(f"model blob of height {h} does not match the state's model hash")
            self._verified.add(model_hash)
        extra_models: list[Row] = []
        if prev is not None and not self.files.exists(prev):  # the genesis model, before height 1 (momentum)
            sink = self.files.sink(prev)
            write_tensors(prev_model, sink.write)
            if not sink.commit():
                raise StoreError(f"previous model blob of height {h} does not match its hash")
            extra_models.append((prev, sink.size, h, "model"))
        with self._pending_lock:
            pending = dict(self._pending)
        rows: list[Row] = []
        orphans: list[Row] = []
        present = set(self.files.make_durable(sorted(in_block | set(pending) | {model_hash} |
                                                     {e[0] for e in extra_models})))
        if model_hash not in present:
            raise StoreError(f"model blob of height {h} vanished before its commit")
        for bh in sorted(present & (in_block | set(pending))):  # absent ones: indexed once put
            size, announced = pending.get(bh, (os.path.getsize(self.files.path(bh)), None))
            if bh in in_block:
                rows.append((bh, size, max(h, announced or h), "update"))
            elif announced is not None:
                rows.append((bh, size, announced, "update"))
            else:
                orphans.append((bh, size, h, "update"))  # height unknown: keep one window from now
        return StagedBlobs([*rows, (model_hash, model_size, h, "model")], [*extra_models, *orphans], pending)

    def committed(self, staged: StagedBlobs) -> None:
        """After the height's transaction: what it indexed is no longer pending (unless received again since)."""
        with self._pending_lock:
            for bh, entry in staged.pending.items():
                if self._pending.get(bh) == entry:
                    del self._pending[bh]

    # ---------------------------------------------------------------- pruning

    def prune(self, cutoff: int, keep: set[bytes], removed: list[bytes] | None = None) -> int:
        """Delete the blobs of heights below `cutoff`, except those in `keep` (the models the chain still needs).
        Orphans (never in a block) go once their announced height is below it. Returns how many went; their
        hashes are appended to `removed`."""
        gone = [bh for bh in (bytes(r[0]) for r in self.db.conn.execute(
            "SELECT hash FROM blob_index WHERE height < ?", (cutoff,))) if bh not in keep]
        with self._pending_lock:
            stale = [bh for bh, (_, ah) in self._pending.items() if ah is not None and ah < cutoff]
            for bh in stale:
                del self._pending[bh]
        floor = max(cutoff, self.floor())

        def body(c: sqlite3.Connection) -> None:
            c.executemany("DELETE FROM blob_index WHERE hash = ? AND height < ?", [(bh, cutoff) for bh in gone])
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('blob_floor', ?)", (str(floor).encode(),))

        self.db.transaction(body)  # index first: a reader never expects a blob that is already gone
        for bh in (*gone, *stale):
            self.files.remove(bh)
            self._verified.discard(bh)
        if removed is not None:
            removed.extend((*gone, *stale))
        return len(gone) + len(stale)

    # ---------------------------------------------------------------- old stores, and recovery at open

    def _legacy_blob(self, h: bytes, probe: bool = False, check: bool = True) -> bytes | None:
        """A blob from an old store's `blobs` table (read-only openers of a store not yet migrated)."""
        if not self.legacy:
            return None
        try:
            row = self.db.conn.execute(f"SELECT {'1' if probe else 'data'} FROM blobs WHERE hash = ?",
                                       (h,)).fetchone()
        except sqlite3.DatabaseError:  # the writer migrated and dropped the table meanwhile
            return None
        if row is None:
            return None
        if probe:
            return b""
        data = bytes(row[0])
        return data if not check or digest(data) == h else None

    def migrate_legacy(self, model_at: dict[bytes, int], update_at: dict[bytes, int], top: int) -> None:
        """Move an old store's `blobs` table into files, in batches; each batch's files are fsync'd before the
        transaction that indexes them and deletes their rows, so a crash anywhere just redoes the batch.
        `model_at` / `update_at`: the last height naming each model / update blob; `top`: the latest height."""
        sizes = [(bytes(r[0]), int(r[1])) for r in self.db.conn.execute("SELECT hash, length(data) FROM blobs")]
        while sizes:
            batch: list[bytes] = []
            total = 0
            while sizes and (not batch or total + sizes[-1][1] <= LEGACY_BATCH_BYTES):
                bh, n = sizes.pop()
                batch.append(bh)
                total += n
            rows = []
            for bh in batch:
                data = self._legacy_blob(bh, check=False)
                if data is None or digest(data) != bh:
                    continue  # corrupt: dropped, never served
                self.files.write(bh, data)
                kind = "model" if bh in model_at else "update"
                at = max(model_at.get(bh, 0), update_at.get(bh, 0)) or top  # an orphan: keep one window from now
                rows.append((bh, len(data), at, kind))
            self.files.make_durable([r[0] for r in rows])

            def body(c: sqlite3.Connection, batch: list[bytes] = batch, rows: list[Any] = rows) -> None:
                c.executemany(UPSERT_INDEX, rows)
                c.executemany("DELETE FROM blobs WHERE hash = ?", [(bh,) for bh in batch])

            self.db.transaction(body)
        self.db.conn.execute("DROP TABLE blobs")
        self.legacy = False

    def recover(self) -> None:
        """At open: drop temporary files, and re-hash blob files the index does not know (received after the last
        commit, never fsync'd: after a power cut one may be torn). Good ones wait for the next commit."""
        indexed = {bytes(r[0]) for r in self.db.conn.execute("SELECT hash FROM blob_index")}
        for bh, p in self.files.scan():
            if bh is None:
                if p.name.startswith(BlobFiles.TMP):
                    p.unlink(missing_ok=True)
                continue
            if bh in indexed:
                continue
            sha, size = hashlib.sha256(), 0
            with open(p, "rb") as f:  # in pieces: a blob can be larger than we want in memory
                while piece := f.read(1 << 22):
                    sha.update(piece)
                    size += len(piece)
            if sha.digest() != bh:
                p.unlink(missing_ok=True)
            else:
                self._pending[bh] = (size, None)
                self._verified.add(bh)
