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
    from flnode.node.app.state import state_size_cap
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
    store = ChainStore.open(paths.chain_db, readonly=True, genesis_hash=genesis.hash())
    store.state_max_bytes = state_size_cap(genesis)
    return genesis, store


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
    from flnode.node.chain import views
    from rich.console import Console
    from rich.table import Table

    genesis, store = _open(home)
    try:
        top = store.latest_height()
        if height is not None:
            if not 1 <= height <= top:
                fail(f"height {height} is not committed (chain height {top})")
            detail = views.block_detail(genesis, store, height)
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
        rows = [views.height_row(genesis, store, h) for h in range(max(1, top - last + 1), top + 1)]
        dp = views.privacy_rows(genesis, store, top)
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
