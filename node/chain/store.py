"""The chain store: the object callers open. It owns the chain database (db.py: SQLite, WAL, synchronous=FULL, so
every commit is fsync'd) and its parts: the chain rows here (blocks, certificates, states, receipts, metrics, meta),
the blob store (`blobs`, blob_store.py) and the consensus log (`log`, consensus_log.py).

One writer (the daemon) and any number of read-only readers (status, chain show/verify, the demo) at once.
A height is committed in one transaction: block, certificate, app state, receipt and the blob index rows
together, so after kill -9 the store always opens at the last committed height, intact.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flnode.node.app import AppState, Receipt, decode_state, encode_state
from flnode.node.app.state import STATE_BASE_BYTES
from flnode.protocol.encoding import pack, unpack
from flnode.protocol.errors import ProtocolError
from flnode.protocol.messages import Block, CommitCertificate
from flnode.protocol.tensors import decode_tensors, tensors_hash

from .blob_files import BlobSink, BlobWriteError, DiskFullError, default_blob_dir
from .blob_store import BlobStore
from .consensus_log import ConsensusLog
from .db import Db, StoreError, connect

__all__ = ["BlobSink", "BlobWriteError", "ChainStore", "DiskFullError", "StoreError"]

EMPTY_MODEL_HASH = tensors_hash({})


class ChainStore:
    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool, blob_dir: Path) -> None:
        self.db = Db(conn, path)
        self.path = path
        self.readonly = readonly
        self.blobs = BlobStore(self.db, blob_dir, readonly)
        self.log = ConsensusLog(self.db)
        self.state_max_bytes = STATE_BASE_BYTES  # the daemon sets its genesis' cap (state_size_cap)

    @property
    def conn(self) -> sqlite3.Connection:
        return self.db.conn

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False, genesis_hash: bytes | None = None,
             blob_dir: Path | None = None) -> ChainStore:
        path = Path(path)
        conn = connect(path, readonly)
        store = cls(conn, path, readonly, blob_dir or default_blob_dir(path))
        if genesis_hash is not None:
            stored = store.db.meta("genesis_hash")
            if stored is None and not readonly:
                store.db.set_meta("genesis_hash", genesis_hash)
            elif stored is not None and stored != genesis_hash:
                conn.close()
                raise StoreError(f"chain store {path} belongs to another genesis")
        if not readonly:
            try:
                if store.blobs.legacy:
                    store.blobs.migrate_legacy(*store._blob_heights(), store.latest_height())
                store.blobs.recover()
            except OSError as exc:
                conn.close()
                raise StoreError(f"cannot prepare blob directory {store.blobs.files.root}: {exc}") from None
        return store

    def close(self) -> None:
        self.conn.close()

    def _blob_heights(self) -> tuple[dict[bytes, int], dict[bytes, int]]:
        """The last height naming each model blob (a state) and each update blob (a block): for the migration."""
        model_at = {bytes(r[0]): int(r[1]) for r in
                    self.conn.execute("SELECT model_hash, MAX(height) FROM states GROUP BY model_hash")}
        update_at: dict[bytes, int] = {}
        for (raw,) in self.conn.execute("SELECT data FROM blocks ORDER BY height"):
            block = self.db.decode(Block.decode, raw, "block")
            for u in block.updates:
                update_at[u.blob_hash] = block.height
        return model_at, update_at

    # ---------------------------------------------------------------- heights

    def latest_height(self) -> int:
        return int(self.db.one("SELECT COALESCE(MAX(height), 0) FROM blocks") or 0)

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
        staged = self.blobs.stage_height(h, state.model_hash, model_blob, {u.blob_hash for u in block.updates},
                                         getattr(state, "prev_model_hash", None), getattr(state, "prev_model", {}))

        def body(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO blocks (height, hash, data) VALUES (?, ?, ?)", (h, block.hash(), block.encode()))
            c.execute("INSERT INTO certificates (height, data) VALUES (?, ?)", (h, cert.encode()))
            c.execute("INSERT INTO states (height, model_hash, data) VALUES (?, ?, ?)",
                      (h, state.model_hash, encode_state(state)))
            c.execute("INSERT INTO receipts (height, data) VALUES (?, ?)", (h, receipt.encode()))
            staged.index(c)

        self.db.transaction(body)
        self.blobs.committed(staged)

    def get_block(self, h: int) -> Block | None:
        raw = self.db.one("SELECT data FROM blocks WHERE height = ?", h)
        return None if raw is None else self.db.decode(Block.decode, raw, f"block {h}")

    def get_certificate(self, h: int) -> CommitCertificate | None:
        raw = self.db.one("SELECT data FROM certificates WHERE height = ?", h)
        return None if raw is None else self.db.decode(CommitCertificate.decode, raw, f"certificate {h}")

    def get_receipt(self, h: int) -> Receipt | None:
        raw = self.db.one("SELECT data FROM receipts WHERE height = ?", h)
        return None if raw is None else self.db.decode(Receipt.decode, raw, f"receipt {h}")

    def get_state(self, h: int) -> AppState:
        row = self.state_row(h)
        if row is None:
            raise StoreError(f"no state stored for height {h}")
        blob = self.blobs.get(row[0])
        if blob is None:
            raise StoreError(f"model blob of height {h} is missing (pruned below height {self.blobs.floor()}?)")
        try:
            fields = unpack(row[1], max_size=self.state_max_bytes)
            if isinstance(fields, list) and len(fields) == 11:  # it names the previous model (momentum rules)
                prev_blob = self.blobs.get(bytes(fields[10]))
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
        keep = {bytes(r[0]) for r in self.conn.execute("SELECT model_hash FROM states WHERE height >= ?", (cutoff,))}
        previous = self._previous_model(cutoff)  # the model the state at the cut-off points back at
        return self.blobs.prune(cutoff, keep | ({previous} if previous else set()), removed)

    def _previous_model(self, h: int) -> bytes | None:
        """The previous model's hash the state of `h` names (centered_clip_momentum), or None."""
        row = self.state_row(h)
        if row is None:
            return None
        fields = unpack(row[1], max_size=self.state_max_bytes)
        return bytes(fields[10]) if isinstance(fields, list) and len(fields) == 11 else None

    # ---------------------------------------------------------------- the consensus log (callers of before)

    def restorable_records(self, height: int, check: Callable[[Sequence[bytes]], int]) -> list[bytes]:
        return self.log.restorable(height, check)

    def prune_records(self, below: int) -> None:
        self.log.prune(below)

    # ---------------------------------------------------------------- metrics (not consensus data)

    def put_metrics(self, h: int, info: dict[str, Any]) -> None:
        self.conn.execute("INSERT OR REPLACE INTO metrics (height, data) VALUES (?, ?)", (h, json.dumps(info)))

    def get_metrics(self, h: int) -> dict[str, Any] | None:
        raw = self.db.one("SELECT data FROM metrics WHERE height = ?", h)
        return None if raw is None else dict(json.loads(raw))

    def metrics_between(self, start: int, end: int) -> list[tuple[int, dict[str, Any]]]:
        """(height, metrics) of the heights from start to end that have them, in order."""
        rows = self.conn.execute(
            "SELECT height, data FROM metrics WHERE height BETWEEN ? AND ? ORDER BY height", (start, end))
        return [(int(h), dict(json.loads(raw))) for h, raw in rows]
