"""The chain store: SQLite in WAL mode with synchronous=FULL, so every commit is fsync'd, plus blob files.

One writer (the daemon) and any number of read-only readers (status, chain show/verify, the demo) at once.
A height is committed in one transaction: block, certificate, app state, receipt and the blob index rows
together, so after kill -9 the store always opens at the last committed height, intact.

Blobs (update and model blobs) are content-addressed files beside the database (see BlobFiles); SQLite only
indexes them (hash, size, height, kind). A blob is written to a temporary name (hashed while it streams in),
fsync'd and renamed, so its hash name never shows a torn file; put_blob does no SQLite write, so receiving updates
never queues behind the fsync'd consensus writes. commit_height makes the directories durable before its
transaction indexes the height's blobs, so an index row always names a durable, whole file.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from flnode.node.app import AppState, Receipt, decode_state, encode_state
from flnode.node.app.state import STATE_BASE_BYTES
from flnode.protocol.encoding import pack, unpack
from flnode.protocol.errors import ProtocolError
from flnode.protocol.hashing import digest
from flnode.protocol.messages import Block, CommitCertificate
from flnode.protocol.tensors import BytesReader, decode_tensors, tensors_hash, write_tensors

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (height INTEGER PRIMARY KEY, hash BLOB NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (height INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS states (height INTEGER PRIMARY KEY, model_hash BLOB NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (height INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blob_index (hash BLOB PRIMARY KEY, size INTEGER NOT NULL, height INTEGER NOT NULL,
    kind TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS blob_index_height ON blob_index (height);
CREATE TABLE IF NOT EXISTS consensus_records (height INTEGER NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (height, seq));
CREATE TABLE IF NOT EXISTS metrics (height INTEGER PRIMARY KEY, data TEXT NOT NULL);
"""
# A row's height is the last height that needs the blob (max over references), kind 'model' wins over 'update':
# pruning by height then never drops a model blob a retained state still points at.
UPSERT_INDEX = (
    "INSERT INTO blob_index (hash, size, height, kind) VALUES (?, ?, ?, ?) ON CONFLICT(hash) DO UPDATE SET "
    "height = MAX(height, excluded.height), "
    "kind = CASE WHEN kind = 'model' OR excluded.kind = 'model' THEN 'model' ELSE 'update' END"
)
LEGACY_BATCH_BYTES = 64 << 20
EMPTY_MODEL_HASH = tensors_hash({})


class StoreError(Exception):
    """The store cannot be opened or is inconsistent."""


class BlobWriteError(StoreError):
    """A blob file could not be written (an OSError other than a full disk)."""


class DiskFullError(BlobWriteError):
    """No space (or quota) left for a blob: stop fetching blobs, keep voting."""


_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="blob-fsync")


def _fsync(path: Path) -> bool:
    """fsync a file or directory; False if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def default_blob_dir(db: Path) -> Path:
    """data/chain.sqlite -> data/blobs; any other name gets its own directory, so stores sharing a folder
    (tests, tools) never prune each other's files."""
    return db.parent / "blobs" if db.name == "chain.sqlite" else db.parent / f"{db.stem}.blobs"


class BlobFiles:
    """One file per blob at root/ab/abcdef… (hex digest). A blob is written under a temporary name in the same
    directory, fsync'd and renamed, so neither a process crash nor a power cut shows a partial file under its hash
    name; the directory entry is made durable when its height commits (make_durable, before the index row).
    ChainStore.open still re-hashes un-indexed files (a file from before this rule, or a disk that lies)."""

    TMP = ".tmp-"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._dirty_dirs: set[Path] = set()  # renamed into since the last make_durable

    def path(self, h: bytes) -> Path:
        x = h.hex()
        return self.root / x[:2] / x

    def exists(self, h: bytes) -> bool:
        return os.path.exists(self.path(h))  # one stat, no read

    def read(self, h: bytes) -> bytes | None:
        try:
            with open(self.path(h), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, h: bytes, data: bytes) -> bool:
        """Write unless present; True if written. No fsync: make_durable does that when the height commits."""
        p = self.path(h)
        try:
            if os.stat(p).st_size == len(data):
                return False
        except FileNotFoundError:
            pass  # a file of the wrong size is corrupt: replaced below
        tmp = p.parent / f"{self.TMP}{p.name}.{os.getpid()}.{threading.get_ident()}"
        try:
            if not p.parent.is_dir():
                p.parent.mkdir(parents=True, exist_ok=True)
                with self._lock:
                    self._dirty_dirs.add(self.root)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)  # data durable before the name: a torn file never appears under its hash
            finally:
                os.close(fd)
            os.replace(tmp, p)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"disk full writing blob {h.hex()[:16]} under {self.root}: {exc}") from None
            raise BlobWriteError(f"cannot write blob {h.hex()[:16]} under {self.root}: {exc}") from None
        with self._lock:
            self._dirty_dirs.add(p.parent)
        return True

    def remove(self, h: bytes) -> None:
        self.path(h).unlink(missing_ok=True)

    def sink(self, h: bytes) -> BlobSink:
        """A temporary file to stream `h` into (see BlobSink)."""
        return BlobSink(self, h)

    def reader(self, h: bytes) -> FileReader | None:
        try:
            return FileReader(self.path(h))
        except FileNotFoundError:
            return None

    def make_durable(self, hashes: Sequence[bytes]) -> list[bytes]:
        """fsync these blobs' data and every directory renamed into since the last call, all in parallel (the
        file system can share one journal commit among them); returns the hashes present. Data and directory
        order does not matter here: nothing is indexed before all are done, and open() re-hashes what is not."""
        with self._lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        paths = [self.path(h) for h in hashes]
        done = list(_POOL.map(_fsync, [*paths, *dirs]))
        return [h for h, ok in zip(hashes, done, strict=False) if ok]

    def scan(self) -> Iterator[tuple[bytes | None, Path]]:
        """Every file: (hash, path), or (None, path) for a temporary or foreign name."""
        if not self.root.is_dir():
            return
        for sub in os.scandir(self.root):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for e in os.scandir(sub.path):
                try:
                    h = bytes.fromhex(e.name) if len(e.name) == 64 and e.name.startswith(sub.name) else None
                except ValueError:
                    h = None
                yield h, Path(e.path)


_SEQ = itertools.count()


class BlobSink:
    """A blob arriving in pieces: written to a temporary name and hashed in the same pass, then (commit) checked
    against its hash, fsync'd and renamed. Until then nothing is visible under the hash name; a crash leaves only a
    temporary file, which ChainStore.open deletes. One writer at a time (calls may come from different threads)."""

    def __init__(self, files: BlobFiles, h: bytes) -> None:
        self.files = files
        self.h = h
        self.size = 0
        self._sha = hashlib.sha256()
        p = files.path(h)
        self.tmp = p.parent / f"{BlobFiles.TMP}{p.name}.{os.getpid()}.{next(_SEQ)}"
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            try:
                if not self.tmp.parent.is_dir():
                    self.tmp.parent.mkdir(parents=True, exist_ok=True)
                    with self.files._lock:
                        self.files._dirty_dirs.add(self.files.root)
                self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError as exc:
                raise _write_error(exc, self.h, self.files.root) from None
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        fd = self._open()
        self._sha.update(data)
        view = memoryview(data).cast("B")
        self.size += len(view)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.h, self.files.root) from None

    def commit(self) -> bool:
        """True if what was written hashes to h (now durable under its name); False (and removed) otherwise."""
        fd = self._open()
        if self._sha.digest() != self.h:
            self.abort()
            return False
        p = self.files.path(self.h)
        try:
            os.fsync(fd)
            os.close(fd)
            self._fd = None
            os.replace(self.tmp, p)
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.h, self.files.root) from None
        with self.files._lock:
            self.files._dirty_dirs.add(p.parent)
        return True

    def abort(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def _write_error(exc: OSError, h: bytes, root: Path) -> BlobWriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full writing blob {h.hex()[:16]} under {root}: {exc}")
    return BlobWriteError(f"cannot write blob {h.hex()[:16]} under {root}: {exc}")


class FileReader:
    """Random access to a blob file (the tensor codec's BlobReader): reads with pread, so concurrent readers share
    the descriptor; the open descriptor keeps the data readable even if the blob is pruned meanwhile. Its content
    was hash-checked when written (and re-hashed at open if it was never indexed), so readers do not hash again."""

    _fd: int | None = None  # set before open can fail, so __del__ of a half-made reader is quiet

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, n: int) -> bytes:
        if self._fd is None:
            raise ValueError("blob reader is closed")
        out = os.pread(self._fd, n, offset)
        if len(out) < n and offset + len(out) < self.size:  # a short read: rare, finish it
            parts = [out]
            got = len(out)
            while got < n:
                more = os.pread(self._fd, n - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            out = b"".join(parts)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class ChainStore:
    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool, blob_dir: Path) -> None:
        self.conn = conn
        self.path = path
        self.readonly = readonly
        self.blobs = BlobFiles(blob_dir)
        self._pending_lock = threading.Lock()
        # received since the last commit, not yet indexed: hash -> (size, height announced for, or None)
        self._pending: dict[bytes, tuple[int, int | None]] = {}
        self._legacy = False  # an old store with a `blobs` table still holding rows (read-only openers)
        # blob files whose content this process has hashed (written here, or checked once): readers skip the hash
        self._verified: set[bytes] = set()
        self.state_max_bytes = STATE_BASE_BYTES  # the daemon sets its genesis' cap (state_size_cap)

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False, genesis_hash: bytes | None = None,
             blob_dir: Path | None = None) -> ChainStore:
        path = Path(path)
        try:
            if readonly:
                if not path.exists():
                    raise StoreError(f"no chain store at {path}")
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(SCHEMA)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open chain store {path}: {exc}") from None
        store = cls(conn, path, readonly, blob_dir or default_blob_dir(path))
        if genesis_hash is not None:
            stored = store._meta("genesis_hash")
            if stored is None and not readonly:
                store._set_meta("genesis_hash", genesis_hash)
            elif stored is not None and stored != genesis_hash:
                conn.close()
                raise StoreError(f"chain store {path} belongs to another genesis")
        store._legacy = store._one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'blobs'") is not None
        if not readonly:
            try:
                store._migrate_legacy_blobs()
                store._recover_blob_files()
            except OSError as exc:
                conn.close()
                raise StoreError(f"cannot prepare blob directory {store.blobs.root}: {exc}") from None
        return store

    def close(self) -> None:
        self.conn.close()

    # ---------------------------------------------------------------- helpers

    def _one(self, sql: str, *args: Any) -> Any:
        try:
            row = self.conn.execute(sql, args).fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"chain store {self.path}: {exc}") from None
        return None if row is None else row[0]

    def _meta(self, key: str) -> bytes | None:
        v = self._one("SELECT value FROM meta WHERE key = ?", key)
        return None if v is None else bytes(v)

    def _set_meta(self, key: str, value: bytes) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _transaction(self, body: Callable[[sqlite3.Connection], None]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            body(c)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    # ---------------------------------------------------------------- heights

    def latest_height(self) -> int:
        return int(self._one("SELECT COALESCE(MAX(height), 0) FROM blocks") or 0)

    def commit_height(self, block: Block, cert: CommitCertificate, state: AppState, receipt: Receipt,
                      model_blob: bytes | Mapping[str, np.ndarray]) -> None:
        """Block, certificate, state, receipt and the index of this height's blobs: one fsync'd transaction, after
        the model blob, the block's update blobs and every blob received since the last commit are durable.
        `model_blob`: the encoded model, or the model's tensors (streamed to its file, never encoded in memory)."""
        h = block.height
        if state.height != h or cert.height != h or cert.block_hash != block.hash():
            raise StoreError(f"inconsistent commit for height {h}")
        if h != self.latest_height() + 1:
            raise StoreError(f"commit of height {h} after {self.latest_height()}")
        model_hash = state.model_hash
        if isinstance(model_blob, (bytes, bytearray, memoryview)):
            if digest(model_blob) != model_hash:
                raise StoreError(f"model blob of height {h} does not match the state's model hash")
            model_size = len(model_blob)
            self.blobs.write(model_hash, model_blob)  # DiskFullError: nothing is committed
        elif self.blobs.exists(model_hash):  # an unchanged model (no updates): already on disk
            model_size = os.path.getsize(self.blobs.path(model_hash))
        else:
            sink = self.blobs.sink(model_hash)
            write_tensors(model_blob, sink.write)
            model_size = sink.size
            if not sink.commit():
                raise StoreError(f"model blob of height {h} does not match the state's model hash")
            self._verified.add(model_hash)
        extra_models: list[tuple[bytes, int, int, str]] = []
        prev: bytes | None = getattr(state, "prev_model_hash", None)
        if prev is not None and not self.blobs.exists(prev):  # the genesis model, before height 1 (momentum)
            sink = self.blobs.sink(prev)
            write_tensors(getattr(state, "prev_model", {}), sink.write)
            if not sink.commit():
                raise StoreError(f"previous model blob of height {h} does not match its hash")
            extra_models.append((prev, sink.size, h, "model"))
        with self._pending_lock:
            pending = dict(self._pending)
        rows: list[tuple[bytes, int, int, str]] = []
        orphans: list[tuple[bytes, int, int, str]] = []
        in_block = {u.blob_hash for u in block.updates}
        present = set(self.blobs.make_durable(sorted(in_block | set(pending) | {model_hash} |
                                                     {e[0] for e in extra_models})))
        if model_hash not in present:
            raise StoreError(f"model blob of height {h} vanished before its commit")
        for bh in sorted(present & (in_block | set(pending))):  # absent ones: indexed once put
            size, announced = pending.get(bh, (os.path.getsize(self.blobs.path(bh)), None))
            if bh in in_block:
                rows.append((bh, size, max(h, announced or h), "update"))
            elif announced is not None:
                rows.append((bh, size, announced, "update"))
            else:
                orphans.append((bh, size, h, "update"))  # height unknown: keep one window from now

        def body(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO blocks (height, hash, data) VALUES (?, ?, ?)", (h, block.hash(), block.encode()))
            c.execute("INSERT INTO certificates (height, data) VALUES (?, ?)", (h, cert.encode()))
            c.execute("INSERT INTO states (height, model_hash, data) VALUES (?, ?, ?)",
                      (h, state.model_hash, encode_state(state)))
            c.execute("INSERT INTO receipts (height, data) VALUES (?, ?)", (h, receipt.encode()))
            c.executemany(UPSERT_INDEX, [*rows, (model_hash, model_size, h, "model")])
            c.executemany("INSERT OR IGNORE INTO blob_index (hash, size, height, kind) VALUES (?, ?, ?, ?)",
                          extra_models)
            c.executemany("INSERT OR IGNORE INTO blob_index (hash, size, height, kind) VALUES (?, ?, ?, ?)", orphans)

        self._transaction(body)
        with self._pending_lock:
            for bh, entry in pending.items():
                if self._pending.get(bh) == entry:
                    del self._pending[bh]

    def get_block(self, h: int) -> Block | None:
        raw = self._one("SELECT data FROM blocks WHERE height = ?", h)
        return None if raw is None else self._decode(Block.decode, raw, f"block {h}")

    def get_certificate(self, h: int) -> CommitCertificate | None:
        raw = self._one("SELECT data FROM certificates WHERE height = ?", h)
        return None if raw is None else self._decode(CommitCertificate.decode, raw, f"certificate {h}")

    def get_receipt(self, h: int) -> Receipt | None:
        raw = self._one("SELECT data FROM receipts WHERE height = ?", h)
        return None if raw is None else self._decode(Receipt.decode, raw, f"receipt {h}")

    def get_state(self, h: int) -> AppState:
        row = self.state_row(h)
        if row is None:
            raise StoreError(f"no state stored for height {h}")
        blob = self.get_blob(row[0])
        if blob is None:
            raise StoreError(f"model blob of height {h} is missing (pruned below height {self.blob_floor()}?)")
        try:
            fields = unpack(row[1], max_size=self.state_max_bytes)
            if isinstance(fields, list) and len(fields) == 11:  # it names the previous model (momentum rules)
                prev_blob = self.get_blob(bytes(fields[10]))
                if prev_blob is None:
                    raise StoreError(f"previous model blob of height {h} is missing")
                return decode_state(row[1], decode_tensors(blob), self.state_max_bytes, decode_tensors(prev_blob))
            return decode_state(row[1], decode_tensors(blob), self.state_max_bytes)
        except ProtocolError as exc:
            raise StoreError(f"state of height {h} is corrupt: {exc}") from None

    def light_state(self, h: int) -> AppState:
        """The state after `h` without its model tensors (model = {}): balances, reputation, slashing and the app
        hash, still there after the model blob is pruned."""
        row = self.state_row(h)
        if row is None:
            raise StoreError(f"no state stored for height {h}")
        try:
            fields = unpack(row[1], max_size=self.state_max_bytes)
            if not isinstance(fields, list) or len(fields) < 2:
                raise ProtocolError("app state: not a list")
            fields[1] = EMPTY_MODEL_HASH  # decode_state checks the model against it; the real one is put back
            return replace(decode_state(pack(fields), {}, self.state_max_bytes), model_hash=row[0])
        except ProtocolError as exc:
            raise StoreError(f"state of height {h} is corrupt: {exc}") from None

    def state_row(self, h: int) -> tuple[bytes, bytes] | None:
        try:
            row = self.conn.execute("SELECT model_hash, data FROM states WHERE height = ?", (h,)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"chain store {self.path}: {exc}") from None
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    @staticmethod
    def _decode(fn: Any, raw: bytes, what: str) -> Any:
        try:
            return fn(bytes(raw))
        except ProtocolError as exc:
            raise StoreError(f"stored {what} is corrupt: {exc}") from None

    # ---------------------------------------------------------------- blobs

    def put_blob(self, h: bytes, data: bytes, height: int | None = None) -> None:
        """Store a received blob; `height`: the height it was announced for (when it may be pruned). No fsync and
        no SQLite write: the next commit_height makes it durable and indexes it. Safe from any thread.
        Raises DiskFullError (disk or quota full) or BlobWriteError (any other OSError)."""
        if self.readonly:
            raise StoreError("read-only store")
        if digest(data) != h:
            raise StoreError("blob does not match its hash")
        self.blobs.write(h, data)
        self.adopt_blob(h, len(data), height)

    def blob_sink(self, h: bytes) -> BlobSink:
        """Stream a blob in (one hash pass while writing); BlobSink.commit checks it, then adopt_blob registers it."""
        if self.readonly:
            raise StoreError("read-only store")
        return self.blobs.sink(h)

    def adopt_blob(self, h: bytes, size: int, height: int | None = None) -> None:
        """Register a blob a committed BlobSink put in place (already hash-checked: not hashed again)."""
        self._verified.add(h)
        with self._pending_lock:
            old = self._pending.get(h, (0, None))[1]
            self._pending[h] = (size, height if old is None else max(old, height or old))

    def blob_reader(self, h: bytes) -> FileReader | BytesReader | None:
        """The blob for chunked reading (validation, aggregation, serving), or None. Not hashed: see FileReader."""
        r = self.blobs.reader(h)
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
            if not self.readonly:
                self.blobs.remove(h)
                with self._pending_lock:
                    self._pending.pop(h, None)
            return None
        data = self._legacy_blob(h)
        return None if data is None else BytesReader(data)

    def get_blob(self, h: bytes) -> bytes | None:
        """The blob, hash-checked: a corrupt file is deleted (by the writer) and reported missing."""
        data = self.blobs.read(h)
        if data is not None:
            if digest(data) == h:
                return data
            if not self.readonly:
                self.blobs.remove(h)
                with self._pending_lock:
                    self._pending.pop(h, None)
            return None
        return self._legacy_blob(h)

    def has_blob(self, h: bytes) -> bool:
        """Whether a blob file exists: a stat, never a read (get_blob checks the content)."""
        if self.blobs.exists(h):
            return True
        return self._legacy and self._legacy_blob(h, probe=True) is not None

    def blob_path(self, h: bytes) -> Path | None:
        """The blob's file for streaming readers, or None. Its content is not checked here: hash what you read."""
        p = self.blobs.path(h)
        return p if p.exists() else None

    def open_blob(self, h: bytes) -> BinaryIO | None:
        """The blob's file open for reading, or None (same caveat as blob_path)."""
        try:
            return open(self.blobs.path(h), "rb")
        except FileNotFoundError:
            return None

    def blob_floor(self) -> int:
        """Blobs of heights below this may be pruned; the model blob of this height and all later blobs are kept
        (0: nothing was ever pruned)."""
        raw = self._meta("blob_floor")
        return int(raw.decode()) if raw else 0

    def blob_index(self, h: bytes) -> tuple[int, int, str] | None:
        """(size, height, kind) of an indexed blob."""
        try:
            row = self.conn.execute("SELECT size, height, kind FROM blob_index WHERE hash = ?", (h,)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"chain store {self.path}: {exc}") from None
        return None if row is None else (int(row[0]), int(row[1]), str(row[2]))

    def prune_blobs(self, committed_height: int, retention: int, removed: list[bytes] | None = None) -> int:
        """Delete the blobs of heights below committed_height - retention (retention 0: keep everything). The
        model blob of that cut-off height and every later one stay, so state can be served and verify can
        re-execute from there. Orphans (never in a block) go once their announced height is out of the window.
        Returns how many blobs went; their hashes are appended to `removed` (to drop from caches)."""
        if retention <= 0 or self.readonly:
            return 0
        cutoff = min(committed_height, self.latest_height()) - retention
        if cutoff <= 0:
            return 0
        keep = "SELECT model_hash FROM states WHERE height >= ?"
        named = self._previous_model(cutoff)  # a momentum rule's state at the cut-off names its predecessor
        gone = [bytes(r[0]) for r in self.conn.execute(
            f"SELECT hash FROM blob_index WHERE height < ? AND hash NOT IN ({keep})", (cutoff, cutoff))
            if bytes(r[0]) != named]
        with self._pending_lock:
            stale = [bh for bh, (_, ah) in self._pending.items() if ah is not None and ah < cutoff]
            for bh in stale:
                del self._pending[bh]
        floor = max(cutoff, self.blob_floor())

        def body(c: sqlite3.Connection) -> None:
            c.execute(f"DELETE FROM blob_index WHERE height < ? AND hash NOT IN ({keep}) AND hash != ?",
                      (cutoff, cutoff, named or b""))
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('blob_floor', ?)", (str(floor).encode(),))

        self._transaction(body)  # index first: a reader never expects a blob that is already gone
        for bh in (*gone, *stale):
            self.blobs.remove(bh)
            self._verified.discard(bh)
        if removed is not None:
            removed.extend((*gone, *stale))
        return len(gone) + len(stale)

    def _previous_model(self, h: int) -> bytes | None:
        """The previous model's hash the state of `h` names (centered_clip_momentum), or None."""
        row = self.state_row(h)
        if row is None:
            return None
        fields = unpack(row[1], max_size=self.state_max_bytes)
        return bytes(fields[10]) if isinstance(fields, list) and len(fields) == 11 else None

    def blob_bytes(self) -> int:
        """Bytes in blob files (a directory walk: for tests and tools, not the hot path)."""
        return sum(p.stat().st_size for _, p in self.blobs.scan())

    def _legacy_blob(self, h: bytes, probe: bool = False, check: bool = True) -> bytes | None:
        """A blob from an old store's `blobs` table (read-only openers of a store not yet migrated)."""
        if not self._legacy:
            return None
        try:
            row = self.conn.execute(f"SELECT {'1' if probe else 'data'} FROM blobs WHERE hash = ?", (h,)).fetchone()
        except sqlite3.DatabaseError:  # the writer migrated and dropped the table meanwhile
            return None
        if row is None:
            return None
        if probe:
            return b""
        data = bytes(row[0])
        return data if not check or digest(data) == h else None

    def _migrate_legacy_blobs(self) -> None:
        """Move an old store's `blobs` table into files, in batches; each batch's files are fsync'd before the
        transaction that indexes them and deletes their rows, so a crash anywhere just redoes the batch."""
        if not self._legacy:
            return
        model_at = {bytes(r[0]): int(r[1]) for r in
                    self.conn.execute("SELECT model_hash, MAX(height) FROM states GROUP BY model_hash")}
        update_at: dict[bytes, int] = {}
        for (raw,) in self.conn.execute("SELECT data FROM blocks ORDER BY height"):
            block = self._decode(Block.decode, raw, "block")
            for u in block.updates:
                update_at[u.blob_hash] = block.height
        top = self.latest_height()
        sizes = [(bytes(r[0]), int(r[1])) for r in self.conn.execute("SELECT hash, length(data) FROM blobs")]
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
                self.blobs.write(bh, data)
                kind = "model" if bh in model_at else "update"
                at = max(model_at.get(bh, 0), update_at.get(bh, 0)) or top  # an orphan: keep one window from now
                rows.append((bh, len(data), at, kind))
            self.blobs.make_durable([r[0] for r in rows])

            def body(c: sqlite3.Connection, batch: list[bytes] = batch, rows: list[Any] = rows) -> None:
                c.executemany(UPSERT_INDEX, rows)
                c.executemany("DELETE FROM blobs WHERE hash = ?", [(bh,) for bh in batch])

            self._transaction(body)
        self.conn.execute("DROP TABLE blobs")
        self._legacy = False

    def _recover_blob_files(self) -> None:
        """At open: drop temporary files, and re-hash blob files the index does not know (received after the last
        commit, never fsync'd: after a power cut one may be torn). Good ones wait for the next commit."""
        indexed = {bytes(r[0]) for r in self.conn.execute("SELECT hash FROM blob_index")}
        for bh, p in self.blobs.scan():
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

    # ---------------------------------------------------------------- consensus records (the WAL of own votes)

    def append_record(self, height: int, data: bytes) -> None:
        """Durable (fsync'd) before it returns: the consensus machine's Persist contract."""
        seq = int(self._one("SELECT COALESCE(MAX(seq), -1) + 1 FROM consensus_records WHERE height = ?", height))
        self.conn.execute("INSERT INTO consensus_records (height, seq, data) VALUES (?, ?, ?)", (height, seq, data))

    def records(self, height: int) -> list[bytes]:
        rows = self.conn.execute("SELECT data FROM consensus_records WHERE height = ? ORDER BY seq", (height,))
        return [bytes(r[0]) for r in rows]

    def drop_last_record(self, height: int) -> bool:
        """Delete the last record of `height` (a torn one, found at startup); whether there was one."""
        cur = self.conn.execute(
            "DELETE FROM consensus_records WHERE height = ? AND seq = "
            "(SELECT MAX(seq) FROM consensus_records WHERE height = ?)", (height, height))
        return cur.rowcount > 0

    def restorable_records(self, height: int, check: Callable[[Sequence[bytes]], int]) -> list[bytes]:
        """The records to restore `height` from, at startup: `check` (Tendermint.check_records) says how many are
        good and raises if they cannot be restored safely; a torn last record is deleted here, before any new
        record is appended after it (otherwise a later restore would stop at it and forget the newer ones)."""
        records = self.records(height)
        good = check(records)
        if good < len(records):
            if good != len(records) - 1:
                raise StoreError(f"consensus records of height {height}: only the last one may be torn")
            self.drop_last_record(height)
        return records[:good]

    def prune_records(self, below: int) -> None:
        self.conn.execute("DELETE FROM consensus_records WHERE height < ?", (below,))

    # ---------------------------------------------------------------- metrics (not consensus data)

    def put_metrics(self, h: int, info: dict[str, Any]) -> None:
        self.conn.execute("INSERT OR REPLACE INTO metrics (height, data) VALUES (?, ?)", (h, json.dumps(info)))

    def get_metrics(self, h: int) -> dict[str, Any] | None:
        raw = self._one("SELECT data FROM metrics WHERE height = ?", h)
        return None if raw is None else dict(json.loads(raw))
