"""The consensus log: this node's own consensus records (votes, proposals) per height, the write-ahead log the
consensus machine restores from after a restart. Rows of the chain database's consensus_records table; each append
is its own fsync'd SQLite commit (the writer's connection is in autocommit mode)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .db import Db, StoreError


class ConsensusLog:
    def __init__(self, db: Db) -> None:
        self.db = db

    def append(self, height: int, data: bytes) -> None:
        """Durable (fsync'd) before it returns: the consensus machine's Persist contract."""
        seq = int(self.db.one("SELECT COALESCE(MAX(seq), -1) + 1 FROM consensus_records WHERE height = ?", height))
        self.db.conn.execute("INSERT INTO consensus_records (height, seq, data) VALUES (?, ?, ?)",
                             (height, seq, data))

    def records(self, height: int) -> list[bytes]:
        rows = self.db.conn.execute("SELECT data FROM consensus_records WHERE height = ? ORDER BY seq", (height,))
        return [bytes(r[0]) for r in rows]

    def restorable(self, height: int, check: Callable[[Sequence[bytes]], int]) -> list[bytes]:
        """The records to restore `height` from, at startup: `check` (Tendermint.check_records) says how many are
        good and raises if they cannot be restored safely; a torn last record is deleted here, before any new
        record is appended after it (otherwise a later restore would stop at it and forget the newer ones)."""
        records = self.records(height)
        good = check(records)
        if good < len(records):
            if good != len(records) - 1:
                raise StoreError(f"consensus records of height {height}: only the last one may be torn")
            self._drop_last(height)
        return records[:good]

    def prune(self, below: int) -> None:
        """Forget the records of heights below `below` (committed: never restored again)."""
        self.db.conn.execute("DELETE FROM consensus_records WHERE height < ?", (below,))

    def _drop_last(self, height: int) -> None:
        self.db.conn.execute(
            "DELETE FROM consensus_records WHERE height = ? AND seq = "
            "(SELECT MAX(seq) FROM consensus_records WHERE height = ?)", (height, height))
