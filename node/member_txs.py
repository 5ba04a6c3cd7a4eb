"""The node's side of open membership: a bounded mempool of membership transactions, and the outbox
through which the CLI (`flnode join/admit/remove/leave`) asks the running node to sign and send one.

The CLI writes an intent (JSON) into `<data_dir>/membership/outbox/`; the node signs it with its key at its
current height (so a join signs only what the node has synced), gossips it on the updates topic and, as a
validator, sends it over the consensus transport, again every few seconds until a block carries it or the chain
refuses it. Then the file moves to `done/` with the outcome. Transactions from peers are admitted (the same
rules as in a block, checked against the current state), pooled and relayed once.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from flnode.node.app import AppState, validator_powers
from flnode.node.app.membership import shard_of, tx_problem
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import short
from flnode.protocol.membership import TX_TTL, MembershipTx, Role, TxKind
from flnode.protocol.messages import encode_gossip

log = logging.getLogger("flnode.membership")

MEMPOOL_MAX = 256
MAX_POOLED_JOINS = MEMPOOL_MAX // 2  # junk joins never crowd out the validators' votes and leaves
RESEND_S = 3.0
# Refusals that may only mean "this node is not synced yet": final once the tx is this many heights old.
SETTLE_HEIGHTS = 3
OUTBOX = Path("membership") / "outbox"
DONE = Path("membership") / "done"


def outbox_dir(data_dir: Path) -> Path:
    return data_dir / OUTBOX


def write_intent(data_dir: Path, intent: dict[str, Any], stamp: int) -> Path:
    """For the CLI: queue one transaction for the node to sign and send."""
    d = outbox_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{stamp:020d}-{intent['kind']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(intent, sort_keys=True))
    tmp.replace(path)
    return path


def sign_intent(genesis: Genesis, key: NodeKey, intent: dict[str, Any], height: int) -> MembershipTx:
    kind = str(intent["kind"])
    if kind == "join":
        return MembershipTx.join(key, genesis.chain_id, height, Role.parse(str(intent.get("role", "trainer"))),
                                 int(intent["samples"]), str(intent["moniker"]), int(intent.get("data_seed", 0)))
    if kind == "leave":
        return MembershipTx.leave(key, genesis.chain_id, height)
    return MembershipTx.vote(TxKind[kind.upper()], key, genesis.chain_id, height, bytes.fromhex(str(intent["target"])))


class MemberTxs:
    """Mempool and outbox. `send(data, height)` gossips and, for a validator, sends over the transport."""

    def __init__(self, genesis: Genesis, key: NodeKey, data_dir: Path | None,
                 state: Callable[[], AppState], send: Callable[[bytes, int], Any]) -> None:
        self.genesis, self.key, self.data_dir = genesis, key, data_dir
        self._state, self._send = state, send
        self.pool: OrderedDict[bytes, MembershipTx] = OrderedDict()  # arrival order
        self._by_intent: dict[tuple[bytes, int, bytes], bytes] = {}  # (signer, kind, target) -> pooled tx hash
        self._signed: dict[Path, tuple[MembershipTx, float]] = {}  # outbox file -> (tx, last sent)

    # ---------------------------------------------------------------- mempool

    def problem(self, tx: MembershipTx) -> str | None:
        """Why `tx` is not admitted from the network (or pooled), or None."""
        if self.genesis.rules.admission == "genesis":
            return "membership_closed"
        state = self._state()
        return tx_problem(self.genesis, state, tx, validator_powers(self.genesis, state, state.height + 1))

    def add(self, tx: MembershipTx) -> bool:
        """Pool an admitted tx; True if it is new (the caller relays it once). One tx per (signer, kind, target):
        a re-signed one at a later height replaces the earlier; joins fill at most half the pool."""
        h = tx.hash()
        intent = (tx.signer, int(tx.kind), tx.target)
        older = self._by_intent.get(intent)
        if h in self.pool or (older is not None and self.pool[older].height >= tx.height):
            return False
        if older is not None:
            self._drop(older)
        elif len(self.pool) >= MEMPOOL_MAX:
            return False
        elif tx.kind == TxKind.JOIN and sum(1 for t in self.pool.values() if t.kind == TxKind.JOIN) >= \
                MAX_POOLED_JOINS:
            return False
        self.pool[h] = tx
        self._by_intent[intent] = h
        return True

    def _drop(self, h: bytes) -> None:
        tx = self.pool.pop(h)
        self._by_intent.pop((tx.signer, int(tx.kind), tx.target), None)

    def pending(self) -> list[MembershipTx]:
        """What the proposer offers: votes (admit, refuse, remove) and leaves first, then joins, each in arrival
        order, so a flood of joins cannot delay a decision about one."""
        txs = list(self.pool.values())
        return [t for t in txs if t.kind != TxKind.JOIN] + [t for t in txs if t.kind == TxKind.JOIN]

    def committed(self) -> None:
        """After a block: drop what it carried, and what can no longer go into a block."""
        for h, tx in list(self.pool.items()):
            if self.problem(tx) is not None:
                self._drop(h)

    # ---------------------------------------------------------------- the node's own data shard

    def own_shard(self) -> tuple[int, int] | None:
        """(index, shard count) of this node's built-in data if it joined (or is joining) as a trainer."""
        me = self.key.public_key
        m = self._state().membership.members.get(me)
        if m is not None:
            return shard_of(self.genesis, m.data_seed) if m.role.trains else None
        for intent in self._intents().values():
            if intent.get("kind") == "join" and Role.parse(str(intent.get("role", "trainer"))).trains:
                return shard_of(self.genesis, int(intent.get("data_seed", 0)))
        return None

    # ---------------------------------------------------------------- outbox

    def _intents(self) -> dict[Path, dict[str, Any]]:
        if self.data_dir is None:
            return {}
        out = {}
        for path in sorted(outbox_dir(self.data_dir).glob("*.json")):
            try:
                out[path] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return out

    def _finish(self, path: Path, outcome: str, tx: MembershipTx) -> None:
        self._signed.pop(path, None)
        assert self.data_dir is not None
        done = self.data_dir / DONE
        done.mkdir(parents=True, exist_ok=True)
        record = {"tx": tx.hash().hex(), "what": tx.describe(), "outcome": outcome, "height": self._state().height}
        (done / path.name).write_text(json.dumps(record, sort_keys=True))
        path.unlink(missing_ok=True)

    def outbox_pass(self, now: float) -> None:
        state = self._state()
        for path, intent in self._intents().items():
            entry = self._signed.get(path)
            if entry is None or state.height + 1 > entry[0].height + TX_TTL:  # expired: sign again, at our height
                try:
                    entry = (sign_intent(self.genesis, self.key, intent, state.height), -1e9)
                except (KeyError, ValueError, TypeError) as exc:
                    log.warning("bad membership request", extra={"file": path.name, "error": str(exc)[:200]})
                    path.unlink(missing_ok=True)
                    continue
                self._signed[path] = entry
            tx, sent = entry
            why = self.problem(tx)
            if why == "duplicate":  # a block carried it
                log.info("membership tx committed", extra={"tx": short(tx.hash()), "what": tx.describe(),
                                                           "height": state.height})
                if tx.kind == TxKind.JOIN and self.genesis.rules.admission == "validators":
                    log.info("join request on chain: waiting for admission votes (flnode admit on a validator)")
                self._finish(path, "committed", tx)
            elif why is not None and why != "expired" and state.height >= tx.height + SETTLE_HEIGHTS:
                log.warning("membership tx refused", extra={"tx": short(tx.hash()), "what": tx.describe(),
                                                            "why": why})
                self._finish(path, f"refused: {why}", tx)
            elif why is None and now - sent >= RESEND_S:
                if self.add(tx):
                    log.info("membership tx sent", extra={"tx": short(tx.hash()), "what": tx.describe(),
                                                          "height": state.height})
                self._signed[path] = (tx, now)
                self._send(encode_gossip(tx), state.height + 1)

    async def run(self) -> None:
        while True:
            self.outbox_pass(trio.current_time())
            await trio.sleep(1.0)
