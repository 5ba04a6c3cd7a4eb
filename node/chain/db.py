"""The chain database: one SQLite connection in WAL mode with synchronous=FULL (every commit is fsync'd), shared
by the chain rows (store.py), the blob index (blob_store.py) and the consensus log (consensus_log.py), so one
transaction can cover a height's rows of all of them."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flnode.protocol.errors import ProtocolError

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


class StoreError(Exception):
    """The store cannot be opened or is inconsistent."""


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """The writer's connection (autocommit, so each statement outside a transaction is its own fsync'd commit)
    or a read-only one; StoreError if the file is not a database."""
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
    return conn


class Db:
    """The shared connection and the small helpers every part uses."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    def one(self, sql: str, *args: Any) -> Any:
        try:
            row = self.conn.execute(sql, args).fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"chain store {self.path}: {exc}") from None
        return None if row is None else row[0]

    def meta(self, key: str) -> bytes | None:
        v = self.one("SELECT value FROM meta WHERE key = ?", key)
        return None if v is None else bytes(v)

    def set_meta(self, key: str, value: bytes) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def transaction(self, body: Callable[[sqlite3.Connection], None]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            body(c)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    @staticmethod
    def decode(fn: Any, raw: bytes, what: str) -> Any:
        try:
            return fn(bytes(raw))
        except ProtocolError as exc:
            raise StoreError(f"stored {what} is corrupt: {exc}") from None
