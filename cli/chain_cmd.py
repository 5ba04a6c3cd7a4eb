"""`flnode chain show` and `flnode chain verify`: read-only, safe while the node runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import fail, user_errors

chain_app = typer.Typer(help="Inspect and audit the chain.", no_args_is_help=True)
HomeOpt = Annotated[Path, typer.Option("--home", help="Node home directory.")]


def register(app: typer.Typer) -> None:
    app.add_typer(chain_app, name="chain")


def _open(home: Path) -> tuple[Any, Any]:
    from flnode.node.chain.store import ChainStore
    from flnode.node.config import home_paths, load_config
    from flnode.protocol.genesis import Genesis

    home = home.expanduser()
    if not home.is_dir():
        fail(f"home {home} does not exist")
    paths = home_paths(home, load_config(home, {}, os.environ).config)
    genesis = Genesis.load(paths.genesis)
    if not paths.chain_db.exists():
        fail(f"{home} has no chain yet (start the node first)")
    return genesis, ChainStore.open(paths.chain_db, readonly=True, genesis_hash=genesis.hash())


def _slashed_by(genesis: Any, store: Any, block: Any) -> list[dict[str, Any]]:
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


def _height_row(genesis: Any, store: Any, h: int) -> dict[str, Any]:
    block = store.get_block(h)
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
        "trainer": _trainer(metrics),
        "rewards": sum(receipt.rewards.values()) if receipt else 0,
        "slashed": _slashed_by(genesis, store, block),
    }


def _trainer(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """This node's own update at the height: its client's fit metrics and time, or the error that cost the round."""
    if "trainer_error" in metrics:
        return {"error": metrics["trainer_error"], "error_kind": metrics.get("trainer_error_kind", "")}
    if "fit_metrics" in metrics:
        return {"fit_s": metrics.get("fit_s"), "num_examples": metrics.get("num_examples"),
                "metrics": metrics["fit_metrics"]}
    return None


def _trainer_cell(t: dict[str, Any] | None) -> str:
    if t is None:
        return ""
    if "error" in t:
        return f"[red]{t['error_kind']}[/red]"  # the full line is in --height and --json
    m = t["metrics"]
    parts = [f"{m[k]:.2f}" if isinstance(m.get(k), int | float) else "-" for k in ("loss", "accuracy")]
    return f"{'/'.join(parts)} {t['fit_s']:.1f}s"


@chain_app.command("show")
@user_errors
def show(
    home: HomeOpt,
    height: Annotated[int | None, typer.Option("--height", help="Show one block in detail.")] = None,
    last: Annotated[int, typer.Option("--last", help="How many recent heights to list.")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """A table of the chain: height, round, proposer, updates accepted/rejected, model hash, accuracy, rewards."""
    from rich.console import Console
    from rich.table import Table

    genesis, store = _open(home)
    try:
        top = store.latest_height()
        if height is not None:
            if not 1 <= height <= top:
                fail(f"height {height} is not committed (chain height {top})")
            detail = _detail(genesis, store, height)
            if as_json:
                typer.echo(json.dumps(detail))
                return
            c = Console()
            c.print(f"[bold]block {height}[/bold]  {detail['block_hash']}")
            for k in ("round", "proposer", "prev_block_hash", "model_hash", "app_hash", "aggregator", "test_accuracy"):
                c.print(f"  {k:16} {detail[k]}")
            if detail["trainer"] is not None:  # this node's own client at this height
                tr = detail["trainer"]
                c.print(f"  {'own update':16} {tr.get('error') or tr.get('metrics')} ({_trainer_cell(tr)})")
            for m in detail["membership"]:
                c.print(f"  [cyan]membership[/cyan]       {m['kind']} {m['target']} (signed by {m['signer']}), "
                        f"from height {height + 2}")
            for sl in detail["slashed"]:
                c.print(f"  [red]slashed[/red]          {sl['validator']}: no voting power from height {sl['from_height']}")
            t = Table(title="updates")
            for col in ("author", "samples", "local loss", "local acc", "outcome", "reward", "penalty"):
                t.add_column(col)
            for u in detail["updates"]:
                t.add_row(u["author"], str(u["samples"]), f"{u['local_loss']:.4f}", f"{u['local_accuracy']:.3f}",
                          u["outcome"], str(u["reward"]), str(u["penalty"]))
            c.print(t)
            t = Table(title="participants after this block")
            for col in ("participant", "balance", "reputation", "excluded"):
                t.add_column(col)
            for p in detail["participants"]:
                t.add_row(p["name"], str(p["balance"]), str(p["reputation"]), "yes" if p["excluded"] else "")
            c.print(t)
            _print_privacy(genesis, detail["privacy"])
            return
        rows = [_height_row(genesis, store, h) for h in range(max(1, top - last + 1), top + 1)]
        dp = _privacy(genesis, store, top)
        if as_json:
            typer.echo(json.dumps({"chain_id": genesis.chain_id, "height": top, "blocks": rows, "privacy": dp}))
            return
        t = Table(title=f"{genesis.chain_id}: {top} blocks ({genesis.rules.aggregator}, {genesis.task.model} on {genesis.task.dataset})")
        for col in ("height", "round", "proposer", "accepted", "rejected", "model", "test acc", "round s", "rewards",
                    "slashed", "own fit (loss/acc)"):
            t.add_column(col, justify="right" if col not in ("proposer", "model", "slashed") else "left")
        for r in rows:
            t.add_row(
                str(r["height"]), str(r["round"]), r["proposer"], str(r["accepted"]), str(r["rejected"]),
                r["model_hash"][:12],
                f"{r['test_accuracy']:.3f}" if r["test_accuracy"] is not None else "",
                f"{r['round_time_s']:.3f}" if r["round_time_s"] is not None else "", str(r["rewards"]),
                ", ".join(f"{x['validator']} (from {x['from_height']})" for x in r["slashed"]),
                _trainer_cell(r["trainer"]),
            )
        Console().print(t)
        _print_privacy(genesis, dp)
    finally:
        store.close()


def _privacy(genesis: Any, store: Any, h: int) -> list[dict[str, Any]]:
    """Epsilon spent and left per participant after height h (empty when DP is off)."""
    from flnode.node.app import privacy

    return privacy.report(genesis, store.light_state(h)) if h >= 1 else []


def _print_privacy(genesis: Any, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    r = genesis.rules
    how = ("record-level DP-SGD, declared by each trainer (not verifiable)" if r.dp_mode == "record"
           else "participant-level: clip and noise size checked by validators, randomness declared")
    t = Table(title=f"differential privacy: {how}; C={r.dp_clip} z={r.dp_noise} delta={r.dp_delta:g}")
    for col in ("participant", "rounds", "epsilon spent", "budget", "left", ""):
        t.add_column(col)
    for p in rows:
        t.add_row(p["name"], str(p["rounds"]), f"{p['epsilon_spent']:.3f}",
                  "unlimited" if p["epsilon_budget"] is None else f"{p['epsilon_budget']:g}",
                  "" if p["epsilon_left"] is None else f"{p['epsilon_left']:.3f}",
                  "[red]budget spent[/red]" if p["exhausted"] else "")
    Console().print(t)


def _detail(genesis: Any, store: Any, h: int) -> dict[str, Any]:
    from flnode.node.app.membership import name_of as member_name

    block = store.get_block(h)
    receipt = store.get_receipt(h)
    state = store.light_state(h)
    row = _height_row(genesis, store, h)
    outcome = {a: "accepted" for a in receipt.accepted}
    by_hash = {ah: reason for _, ah, reason in receipt.rejected}
    updates = []
    for u in block.updates:
        updates.append({
            "author": member_name(genesis, state, u.author),  # a joined member by its moniker
            "samples": u.num_samples,
            "local_loss": u.loss_ppm / 1e6,
            "local_accuracy": u.accuracy_ppm / 1e6,  # both signed by the author (fit's or evaluate's metrics)
            "outcome": f"rejected: {by_hash[u.hash()]}" if u.hash() in by_hash else outcome.get(u.author, "?"),
            "reward": receipt.rewards.get(u.author, 0),
            "penalty": receipt.penalties.get(u.author, 0),
        })
    threshold = genesis.rules.rewards.exclude_below
    from flnode.node.app.membership import name_of

    participants = [
        {"name": name_of(genesis, state, k), "public_key": k.hex(), "balance": state.balances.get(k, 0),
         "reputation": state.reputation.get(k, 0), "excluded": state.reputation.get(k, 0) < threshold,
         "slashed_from": state.slashed.get(k)}
        for k in [*genesis.participant_keys, *sorted(set(state.membership.members) - set(genesis.powers))]
    ]
    return {
        **row,
        "prev_block_hash": block.header.prev_block_hash.hex(),
        "app_hash": block.header.app_hash.hex(),
        "evidence": len(block.evidence),
        "updates": updates,
        "participants": participants,
        "privacy": _privacy(genesis, store, h),
        # membership transactions (issue 12), each taking effect from height h + 2
        "membership": [{"kind": t.kind.name.lower(), "signer": name_of(genesis, state, t.signer),
                        "target": name_of(genesis, state, t.target), "what": t.describe()} for t in block.txs],
    }


@chain_app.command("verify")
@user_errors
def verify(
    home: HomeOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Replay the chain: links, certificates, signatures for every height; aggregation, rewards and every hash
    re-executed for the heights whose blobs are kept (all of them unless blob pruning is on)."""
    from flnode.node.chain.verify import verify_chain

    genesis, store = _open(home)
    try:
        report = verify_chain(store, genesis)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps(report.__dict__))
    else:
        typer.echo(report.summary(), err=not report.ok)
    if not report.ok:
        raise typer.Exit(1)
