"""The schema of `flnode chain show --json`, built from a (read-only) chain store: one place for the CLI and the
web explorer (node/web/reader.py), so the two cannot drift apart."""

from __future__ import annotations

from typing import Any

from flnode.node.chain.store import ChainStore
from flnode.protocol.genesis import Genesis


def slashed_by(genesis: Genesis, store: ChainStore, block: Any) -> list[dict[str, Any]]:
    """Validators this block's evidence slashed (first conviction), with the height their power drops to 0."""
    from flnode.node.app import slash_height

    if not block.evidence:
        return []
    state = store.light_state(block.height)  # no model needed: still there after pruning
    start = slash_height(block.height)
    return [
        {"validator": genesis.name_of(v), "public_key": v.hex(), "from_height": start}
        for v in sorted({e.validator for e in block.evidence}) if state.slashed.get(v) == start
    ]


def trainer_info(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """This node's own update at the height: its client's fit metrics and time, or the error that cost the round."""
    if "trainer_error" in metrics:
        return {"error": metrics["trainer_error"], "error_kind": metrics.get("trainer_error_kind", "")}
    if "fit_metrics" in metrics:
        return {"fit_s": metrics.get("fit_s"), "num_examples": metrics.get("num_examples"),
                "metrics": metrics["fit_metrics"]}
    return None


def height_row(genesis: Genesis, store: ChainStore, h: int) -> dict[str, Any]:
    """One row of `blocks`; KeyError if h is not committed."""
    block = store.get_block(h)
    if block is None:
        raise KeyError(h)
    cert = store.get_certificate(h)
    receipt = store.get_receipt(h)
    metrics = store.get_metrics(h) or {}
    return {
        "height": h,
        "round": cert.round if cert else None,
        "proposer": genesis.name_of(block.header.proposer),
        "accepted": len(receipt.accepted) if receipt else 0,
        "rejected": len(receipt.rejected) if receipt else 0,
        "aggregator": receipt.aggregator if receipt else "",
        "model_hash": block.header.model_hash.hex(),
        "block_hash": block.hash().hex(),
        "test_accuracy": metrics.get("test_accuracy"),
        "round_time_s": metrics.get("round_time_s"),
        "trainer": trainer_info(metrics),
        "rewards": sum(receipt.rewards.values()) if receipt else 0,
        "slashed": slashed_by(genesis, store, block),
    }


def privacy_rows(genesis: Genesis, store: ChainStore, h: int) -> list[dict[str, Any]]:
    """Epsilon spent and left per participant after height h (empty when DP is off)."""
    from flnode.node.app import privacy

    return privacy.report(genesis, store.light_state(h)) if h >= 1 else []


def member_keys(genesis: Genesis, state: Any) -> list[bytes]:
    """Genesis participants, then members who joined later."""
    return [*genesis.participant_keys, *sorted(set(state.membership.members) - set(genesis.powers))]


def block_detail(genesis: Genesis, store: ChainStore, h: int, row: dict[str, Any] | None = None) -> dict[str, Any]:
    """`chain show --height h --json`; KeyError if h is not committed."""
    from flnode.node.app.membership import name_of

    block = store.get_block(h)
    if block is None:
        raise KeyError(h)
    receipt = store.get_receipt(h)
    state = store.light_state(h)
    row = row if row is not None else height_row(genesis, store, h)
    outcome = {a: "accepted" for a in receipt.accepted} if receipt else {}
    by_hash = {ah: reason for _, ah, reason in receipt.rejected} if receipt else {}
    updates = [
        {
            "author": name_of(genesis, state, u.author),  # a joined member by its moniker
            "samples": u.num_samples,
            "local_loss": u.loss_ppm / 1e6,
            "local_accuracy": u.accuracy_ppm / 1e6,  # both signed by the author (fit's or evaluate's metrics)
            "outcome": f"rejected: {by_hash[u.hash()]}" if u.hash() in by_hash else outcome.get(u.author, "?"),
            "reward": receipt.rewards.get(u.author, 0) if receipt else 0,
            "penalty": receipt.penalties.get(u.author, 0) if receipt else 0,
        }
        for u in block.updates
    ]
    threshold = genesis.rules.rewards.exclude_below
    participants = [
        {"name": name_of(genesis, state, k), "public_key": k.hex(), "balance": state.balances.get(k, 0),
         "reputation": state.reputation.get(k, 0), "excluded": state.reputation.get(k, 0) < threshold,
         "slashed_from": state.slashed.get(k)}
        for k in member_keys(genesis, state)
    ]
    return {
        **row,
        "prev_block_hash": block.header.prev_block_hash.hex(),
        "app_hash": block.header.app_hash.hex(),
        "evidence": len(block.evidence),
        "updates": updates,
        "participants": participants,
        "privacy": privacy_rows(genesis, store, h),
        # membership transactions, each taking effect from height h + 2
        "membership": [{"kind": t.kind.name.lower(), "signer": name_of(genesis, state, t.signer),
                        "target": name_of(genesis, state, t.target), "what": t.describe()} for t in block.txs],
    }
