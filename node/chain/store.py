"""The chain store: SQLite in WAL mode with synchronous=FULL, so every commit is fsync'd.

One writer (the daemon) and any number of read-only readers (status, chain show/verify, the demo) at once.
A height is committed in one transaction: block, certificate, app state, receipt and model blob together, so
after kill -9 the store always opens at the last committed height, intact.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flnode.node.app import AppState, Receipt, decode_state, encode_state
from flnode.protocol.errors import ProtocolError
from flnode.protocol.hashing import digest
from flnode.protocol.messages import Block, CommitCertificate
from flnode.protocol.tensors import decode_tensors

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (height INTEGER PRIMARY KEY, hash BLOB NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (height INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS states (height INTEGER PRIMARY KEY, model_hash BLOB NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (height INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (hash BLOB PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS consensus_records (height INTEGER NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (height, seq));
CREATE TABLE IF NOT EXISTS metrics (height INTEGER PRIMARY KEY, data TEXT NOT NULL);
"""


class StoreError(Exception):
    """The store cannot be opened or is inconsistent."""


class ChainStore:
    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
        self.conn = conn
        self.path = path
        self.readonly = readonly

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False, genesis_hash: bytes | None = None) -> ChainStore:
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
        store = cls(conn, path, readonly)
        if genesis_hash is not None:
            stored = store._meta("genesis_hash")
            if stored is None and not readonly:
                store._set_meta("genesis_hash", genesis_hash)
            elif stored is not None and stored != genesis_hash:
                conn.close()
                raise StoreError(f"chain store {path} belongs to another genesis")
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

    # ---------------------------------------------------------------- heights

    def latest_height(self) -> int:
        return int(self._one("SELECT COALESCE(MAX(height), 0) FROM blocks") or 0)

    def commit_height(self, block: Block, cert: CommitCertificate, state: AppState, receipt: Receipt, model_blob: bytes) -> None:
        """Block, certificate, state, receipt and model blob of one height: one fsync'd transaction."""
        h = block.height
        if state.height != h or cert.height != h or cert.block_hash != block.hash():
            raise StoreError(f"inconsistent commit for height {h}")
        if h != self.latest_height() + 1:
            raise StoreError(f"commit of height {h} after {self.latest_height()}")
        c = self.conn
        try:
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT INTO blocks (height, hash, data) VALUES (?, ?, ?)", (h, block.hash(), block.encode()))
            c.execute("INSERT INTO certificates (height, data) VALUES (?, ?)", (h, cert.encode()))
            c.execute("INSERT INTO states (height, model_hash, data) VALUES (?, ?, ?)",
                      (h, state.model_hash, encode_state(state)))
            c.execute("INSERT INTO receipts (height, data) VALUES (?, ?)", (h, receipt.encode()))
            c.execute("INSERT OR IGNORE INTO blobs (hash, data) VALUES (?, ?)", (digest(model_blob), model_blob))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

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
        row = self.conn.execute("SELECT model_hash, data FROM states WHERE height = ?", (h,)).fetchone()
        if row is None:
            raise StoreError(f"no state stored for height {h}")
        blob = self.get_blob(bytes(row[0]))
        if blob is None:
            raise StoreError(f"model blob of height {h} is missing")
        try:
            return decode_state(bytes(row[1]), decode_tensors(blob))
        except ProtocolError as exc:
            raise StoreError(f"state of height {h} is corrupt: {exc}") from None

    def state_row(self, h: int) -> tuple[bytes, bytes] | None:
        row = self.conn.execute("SELECT model_hash, data FROM states WHERE height = ?", (h,)).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    @staticmethod
    def _decode(fn: Any, raw: bytes, what: str) -> Any:
        try:
            return fn(bytes(raw))
        except ProtocolError as exc:
            raise StoreError(f"stored {what} is corrupt: {exc}") from None

    # ---------------------------------------------------------------- blobs

    def put_blob(self, h: bytes, data: bytes) -> None:
        if digest(data) != h:
            raise StoreError("blob does not match its hash")
        self.conn.execute("INSERT OR IGNORE INTO blobs (hash, data) VALUES (?, ?)", (h, data))

    def get_blob(self, h: bytes) -> bytes | None:
        raw = self._one("SELECT data FROM blobs WHERE hash = ?", h)
        return None if raw is None else bytes(raw)

    def has_blob(self, h: bytes) -> bool:
        return self._one("SELECT 1 FROM blobs WHERE hash = ?", h) is not None

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
