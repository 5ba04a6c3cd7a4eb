"""What the explorer shows, read from the chain store's read-only path.

Every method here is blocking SQLite work and runs on a worker thread (``ChainReader.run``): the node's own store
connection and its store thread are never touched, so a page load never queues behind a consensus write. The row
and detail dicts have the schema of ``flnode chain show --json`` (tests/test_web.py compares them), plus a few
keys the block page needs (``signers``, ``evidence_validators``).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from flnode.node.app import AppState
from flnode.node.app.membership import Membership, counts_at, name_of
from flnode.node.chain import views
from flnode.node.chain.store import ChainStore, StoreError
from flnode.protocol.genesis import Genesis

T = TypeVar("T")

MAX_PAGE = 100  # heights per /api/blocks call
CHART_HEIGHTS = 300  # heights drawn on the overview charts


class ChainReader:
    """A small pool of read-only connections to one chain store, plus caches of what cannot change."""

    def __init__(self, db: Path, genesis: Genesis, *, connections: int = 2) -> None:
        self.db = db
        self.genesis = genesis
        self._pool: queue.SimpleQueue[ChainStore] = queue.SimpleQueue()
        self._opened: list[ChainStore] = []
        self._open_lock = threading.Lock()
        # At most `connections` reads at once; more requests wait here (in trio), not in a thread.
        self.limiter = trio.CapacityLimiter(connections)
        self._rows: OrderedDict[int, dict[str, Any]] = OrderedDict()  # committed rows are immutable once complete
        self._details: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._counts_at = 0  # accepted/rejected counts summed over heights 1.._counts_at
        self._accepted: dict[bytes, int] = {}
        self._rejected: dict[bytes, int] = {}
        self._cache_lock = threading.Lock()

    # ---------------------------------------------------------------- plumbing

    def _take(self) -> ChainStore:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._open_lock:  # the limiter keeps this at `connections` opens at most
            store = ChainStore.open(self.db, readonly=True)
            self._opened.append(store)
            return store

    def _with_store(self, fn: Callable[[ChainStore], T]) -> T:
        store = self._take()
        try:
            return fn(store)
        finally:
            self._pool.put(store)

    async def run(self, fn: Callable[[ChainStore], T]) -> T:
        """Run ``fn(store)`` on a worker thread with a read-only connection; at most ``connections`` at once."""
        return await trio.to_thread.run_sync(self._with_store, fn, limiter=self.limiter)

    def close(self) -> None:
        with self._open_lock:
            for s in self._opened:
                s.close()
            self._opened.clear()

    # ---------------------------------------------------------------- the chain show schema

    @staticmethod
    def latest(store: ChainStore) -> int:
        try:
            return store.latest_height()
        except StoreError:
            return 0  # the node has not created its tables yet

    def privacy(self, store: ChainStore, h: int) -> list[dict[str, Any]]:
        """Epsilon spent per participant after h, as `chain show` reports it ([] when DP is off)."""
        return views.privacy_rows(self.genesis, store, h)

    def height_row(self, store: ChainStore, h: int) -> dict[str, Any]:
        """One row of ``flnode chain show --json``'s ``blocks``."""
        with self._cache_lock:
            cached = self._rows.get(h)
        if cached is not None:
            return cached
        row = views.height_row(self.genesis, store, h)
        if row["test_accuracy"] is not None:  # metrics land just after the commit; cache only the final row
            self._remember(self._rows, h, row, 4096)
        return row

    def blocks(self, store: ChainStore, start: int, end: int, top: int | None = None) -> dict[str, Any]:
        """``flnode chain show --json`` for heights start..end (clipped to the committed height `top`, read here
        unless the caller already did: one answer names one tip, even while the node commits meanwhile)."""
        top = self.latest(store) if top is None else top
        rows = [self.height_row(store, h) for h in range(max(1, start), min(end, top) + 1)]
        return {"chain_id": self.genesis.chain_id, "height": top, "blocks": rows, "privacy": self.privacy(store, top)}

    def block(self, store: ChainStore, h: int) -> dict[str, Any] | None:
        """``flnode chain show --height h --json`` plus signers and evidence; None if h is not committed."""
        with self._cache_lock:
            cached = self._details.get(h)
        if cached is not None:
            return cached
        g = self.genesis
        block = store.get_block(h)
        if block is None:
            return None
        cert = store.get_certificate(h)
        row = self.height_row(store, h)
        detail = {
            **views.block_detail(g, store, h, row),
            # beyond chain show: who signed the commit, and whom the evidence names
            "signers": [g.name_of(v) for v, _ in cert.signatures] if cert else [],
            "evidence_validators": [g.name_of(e.validator) for e in block.evidence],
        }
        if row["test_accuracy"] is not None:
            self._remember(self._details, h, detail, 256)
        return detail

    def participants(self, store: ChainStore) -> dict[str, Any]:
        """Every participant after the latest block, with updates accepted/rejected over the whole chain."""
        g = self.genesis
        top = self.latest(store)
        with self._cache_lock:
            start = self._counts_at
        acc: dict[bytes, int] = {}
        rej: dict[bytes, int] = {}
        for h in range(start + 1, top + 1):  # receipts are immutable: count each height once
            receipt = store.get_receipt(h)
            if receipt is None:
                continue
            for a in receipt.accepted:
                acc[a] = acc.get(a, 0) + 1
            for a, _, _ in receipt.rejected:
                rej[a] = rej.get(a, 0) + 1
        with self._cache_lock:
            if self._counts_at == start:  # another thread may have counted the same heights meanwhile
                for k, n in acc.items():
                    self._accepted[k] = self._accepted.get(k, 0) + n
                for k, n in rej.items():
                    self._rejected[k] = self._rejected.get(k, 0) + n
                self._counts_at = top
            accepted, rejected, counted = dict(self._accepted), dict(self._rejected), self._counts_at
        state = store.light_state(counted) if counted > 0 else None
        threshold = g.rules.rewards.exclude_below
        rows = []
        for k in self.participant_keys(state):
            rep = state.reputation.get(k, 0) if state else 0
            rows.append({
                "name": name_of(g, state, k) if state else g.name_of(k), "public_key": k.hex(),
                "balance": state.balances.get(k, 0) if state else 0,
                "reputation": rep, "excluded": state is not None and rep < threshold,
                "slashed_from": state.slashed.get(k) if state else None,
                "accepted": accepted.get(k, 0), "rejected": rejected.get(k, 0),
            })
        dp = {p["name"]: p for p in self.privacy(store, counted)}
        for row in rows:
            spent = dp.get(row["name"])
            row["epsilon_spent"] = spent["epsilon_spent"] if spent else None
            row["epsilon_budget"] = spent["epsilon_budget"] if spent else None
        return {"chain_id": g.chain_id, "height": counted, "participants": rows}

    def participant_keys(self, state: AppState | None) -> list[bytes]:
        """Genesis participants, then members admitted by transaction (as `chain show` lists them)."""
        return views.member_keys(self.genesis, state) if state else list(self.genesis.participant_keys)

    def members(self, store: ChainStore) -> dict[str, Any]:
        """Who is in the network after the latest block: genesis validators and admitted members, whether each
        is in force at the next height, and the joins and removals still being voted on."""
        g = self.genesis
        top = self.latest(store)
        ms = store.light_state(top).membership if top > 0 else Membership()
        rows = []
        for k in [*g.participant_keys, *sorted(set(ms.members) - set(g.powers))]:
            m = None if k in g.powers else ms.members.get(k)
            rows.append({
                "name": m.moniker if m else g.name_of(k), "public_key": k.hex(), "genesis": m is None,
                "role": m.role.name.lower() if m else "both", "power": m.power if m else g.powers[k],
                "since": m.since if m else 1, "ended": ms.ended.get(k),
                "in_force": counts_at(g, ms, k, top + 1),
            })

        def who(k: bytes) -> str:
            m = ms.members.get(k)
            return m.moniker if m is not None and k not in g.powers else g.name_of(k)

        requests = [{"target": tx.moniker or who(k), "public_key": k.hex(), "kind": tx.kind.name.lower(),
                     "what": tx.describe(), "votes": len(b.votes), "opened": b.opened}
                    for k, (tx, b) in sorted(ms.requests.items())]
        removals = [{"target": who(k), "public_key": k.hex(), "votes": len(b.votes), "opened": b.opened}
                    for k, b in sorted(ms.removals.items())]
        return {"chain_id": g.chain_id, "height": top, "members": rows, "requests": requests, "removals": removals}

    def series(self, store: ChainStore, last: int = CHART_HEIGHTS) -> dict[str, Any]:
        """Per-height test accuracy, test loss and round time of the last ``last`` heights (for the charts)."""
        top = self.latest(store)
        start = max(1, top - last + 1)
        try:
            rows = store.metrics_between(start, top)
        except Exception:  # noqa: BLE001 - no metrics table yet: nothing to draw
            rows = []
        out: dict[str, Any] = {"height": top, "heights": [], "test_accuracy": [], "test_loss": [], "round_time_s": []}
        for h, m in rows:
            out["heights"].append(h)
            for k in ("test_accuracy", "test_loss", "round_time_s"):
                out[k].append(m.get(k))
        return out

    def _remember(self, cache: OrderedDict[int, dict[str, Any]], h: int, value: dict[str, Any], size: int) -> None:
        with self._cache_lock:
            cache[h] = value
            while len(cache) > size:
                cache.popitem(last=False)
