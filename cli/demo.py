"""`flnode demo`: a real multi-node network on this machine, on the built-in digits data, shown live."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import fail, user_errors
from .options import AGGREGATOR_HELP
from .testnet import _task_and_rules, aggregator_rules, create_testnet, free_ports, open_membership_rules


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


# One BLAS thread per node process, unless the user chose: several nodes share this machine's cores, and each
# process's default pool (one spinning thread per core) fights the others' (10M parameters, 4 nodes on 2 cores:
# local training 1.28 -> 0.78 s).
ONE_MACHINE_THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_node(home: Path, *extra: str, log_format: str = "json") -> subprocess.Popen[bytes]:
    """A node of a network that runs on this machine (demo, tests, benchmarks)."""
    log = open(home / "node.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [sys.executable, "-m", "flnode.cli.main", "start", "--home", str(home), "--log-format", log_format, *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**ONE_MACHINE_THREADS, **os.environ, "PYTHONUNBUFFERED": "1"},
    )


def stop_nodes(procs: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass
class NodeView:
    name: str
    home: Path
    height: int = 0
    model_hash: str = ""
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    updates: dict[int, int] = field(default_factory=dict)


def read_node(view: NodeView) -> None:
    """Read a running node's store read-only (SQLite WAL: no lock fight with the writer)."""
    from flnode.node.chain.store import ChainStore, StoreError

    db = view.home / "data" / "chain.sqlite"
    if not db.exists():
        return
    try:
        store = ChainStore.open(db, readonly=True)
    except StoreError:
        return
    try:
        try:
            top = store.latest_height()
        except StoreError:
            return  # the node has not created its tables yet
        for h in range(view.height + 1, top + 1):
            block = store.get_block(h)
            if block is not None:
                view.updates[h] = len(block.updates)
        for h in range(max(1, top - 5), top + 1):
            if h not in view.metrics or not view.metrics[h]:
                view.metrics[h] = store.get_metrics(h) or {}
        if top > view.height:
            st = store.get_state(top)
            view.model_hash = st.model_hash.hex()
            view.height = top
    finally:
        store.close()


def accuracy_chart(acc: list[float], width: int = 60, height: int = 10) -> str:
    """A small text chart of accuracy per round (y from min to 1.0)."""
    if not acc:
        return ""
    lo = max(0.0, min(acc) - 0.05)
    hi = 1.0
    cols = acc if len(acc) <= width else [acc[int(i * len(acc) / width)] for i in range(width)]
    rows = []
    for r in range(height, 0, -1):
        level = lo + (hi - lo) * r / height
        line = "".join("█" if v >= level else ("▄" if v >= level - (hi - lo) / (2 * height) else " ") for v in cols)
        rows.append(f"{level:5.2f} │{line}")
    rows.append("      └" + "─" * len(cols))
    rows.append(f"       round 1 … {len(acc)}")
    return "\n".join(rows)


def enable_web(node_home: Path, port: int = 26680) -> str:
    """Turn on node0's read-only web explorer (127.0.0.1 only): the default port if free, else any free one."""
    from dataclasses import replace

    from flnode.node.config import load_config, write_config

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            port = free_ports(1)[0]
    cfg = load_config(node_home).config
    write_config(node_home, replace(cfg, http_listen=f"127.0.0.1:{port}"))
    return f"http://127.0.0.1:{port}/"


@user_errors
def demo(
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=32, help="Number of node processes.")] = 4,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Training rounds (heights) to run.")] = 20,
    home: Annotated[Path, typer.Option("--home", help="Where the node homes are written (kept afterwards).")] = Path(
        "demo-home"
    ),
    aggregator: Annotated[str, typer.Option(help=AGGREGATOR_HELP)] = "robust",
    model: Annotated[str, typer.Option(help="logreg | mlp")] = "logreg",
    partition: Annotated[str, typer.Option(help="iid | dirichlet")] = "iid",
    trainer: Annotated[str, typer.Option("--trainer", help="Own client, 'pkg.module:make_client'.")] = "",
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary instead of the live view.")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="After the last round, keep the network running (and the "
                                       "web explorer live) until Ctrl-C.")] = False,
    trainers: Annotated[int, typer.Option("--trainers", min=0, max=32, help="Trainer processes that join by "
                                          "transaction (open membership); then validators do not train.")] = 0,
    validators: Annotated[int, typer.Option("--validators", min=0, max=32, help="Validators with --trainers "
                                            "(default: --nodes).")] = 0,
    join_late: Annotated[int, typer.Option("--join-late", min=0, help="Of the trainers, this many start (and ask "
                                           "to join) only after a third of the rounds.")] = 0,
) -> None:
    """Run N real `flnode start` processes on 127.0.0.1 and show federated learning live."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    console = Console(stderr=as_json)
    home = home.expanduser().resolve()
    if home.exists() and any(home.iterdir()) and not (home / "node0").exists():
        fail(f"{home} exists and is not a demo home; choose another --home")
    nodes = validators or nodes
    ports = free_ports(nodes + trainers)
    # An own client's first fit (a PyTorch import and first pass in every process at once) takes seconds: the
    # proposer waits up to 10 s for the updates instead of 2 s, so the first rounds are not empty; once every
    # update is in it proposes at once, so later rounds cost nothing more.
    collect_ms = 10000 if trainer else 2000
    epochs = 3 if trainer else 1  # a CNN from scratch: a few local passes per round show learning in 5 rounds
    task_rules = _task_and_rules(model, "digits", partition, 0.5, aggregator, 0, 100.0, epochs, 0.1, collect_ms,
                                 trainer)
    task_rules[1].update(aggregator_rules(aggregator, validators or nodes))
    if trainers:  # trainers join by transaction; the proposer waits for their updates, not for the validators'
        task_rules[1].update(open_membership_rules(task_rules[0], nodes, "open", nodes + trainers),
                             min_updates=trainers, max_recent_join_weight_percent=100,
                             max_joins_per_block=max(4, trainers))
    addrs = create_testnet(home, nodes, chain_id="flnode-demo", host="127.0.0.1", listen_host="127.0.0.1",
                           ports=ports[:nodes], task_rules=task_rules, force=True)
    if trainers:
        from .members_cmd import prepare_trainers

        prepare_trainers(home, nodes, trainers, ports[nodes:], [a for _, a in addrs])
    web_url = enable_web(home / "node0")
    console.print(f"live explorer of node0: [bold]{web_url}[/bold] (open it in a browser while the demo runs; "
                  "--keep keeps it running after the last round)")
    views = [NodeView(f"node{i}", home / f"node{i}") for i in range(nodes)]
    views += [NodeView(f"trainer{i}", home / f"trainer{i}") for i in range(trainers)]
    limit = timeout or (60.0 + 5.0 * rounds)
    t0 = time.monotonic()
    late = views[len(views) - min(join_late, trainers):] if join_late else []
    started = views[: len(views) - len(late)]
    procs = [start_node(v.home) for v in started]
    ok = False

    def table() -> Table:
        t = Table(title=f"flnode demo: {nodes} nodes, {aggregator}, {rounds} rounds  ({time.monotonic() - t0:5.1f} s)")
        for col in ("node", "height", "updates", "test acc", "test loss", "round s", "model"):
            t.add_column(col)
        for v in views:
            m = v.metrics.get(v.height, {})
            t.add_row(
                v.name, str(v.height), str(v.updates.get(v.height, "")),
                f"{m['test_accuracy']:.3f}" if "test_accuracy" in m else "",
                f"{m['test_loss']:.3f}" if "test_loss" in m else "",
                f"{m['round_time_s']:.3f}" if "round_time_s" in m else "",
                v.model_hash[:12],
            )
        return t

    try:
        with Live(table(), console=console, refresh_per_second=8, transient=as_json) as live:
            while time.monotonic() - t0 < limit:
                for v in views:
                    read_node(v)
                live.update(table())
                if late and views[0].height >= max(2, rounds // 3):  # --join-late: these trainers join mid-run
                    procs += [start_node(v.home) for v in late]
                    started, late = started + late, []
                dead = [v.name for v, p in zip(started, procs, strict=True) if p.poll() is not None]
                if dead:
                    console.print(f"[red]node process exited early: {', '.join(dead)} (see its node.log)")
                    break
                if all(v.height >= rounds and rounds in v.metrics and v.metrics[rounds] for v in views):
                    ok = True
                    break
                time.sleep(0.1)
        wall = time.monotonic() - t0
        if ok and keep:
            console.print(f"the network keeps running; explorer: [bold]{web_url}[/bold] (Ctrl-C stops it)")
            try:
                while all(p.poll() is None for p in procs):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    finally:
        stop_nodes(procs)
    wall = wall if ok else time.monotonic() - t0
    for v in views:
        read_node(v)
        for h in range(1, min(v.height, rounds) + 1):
            if not v.metrics.get(h):
                _fill_metrics(v, h)
    from flnode.node.chain.store import ChainStore

    hashes = {}
    for v in views:
        store = ChainStore.open(v.home / "data" / "chain.sqlite", readonly=True)
        try:
            hashes[v.name] = store.get_state(rounds).model_hash.hex() if store.latest_height() >= rounds else None
        finally:
            store.close()
    same = ok and len(set(hashes.values())) == 1 and None not in hashes.values()
    ref = views[0]
    per_round = [
        {
            "round": h,
            "test_accuracy": ref.metrics.get(h, {}).get("test_accuracy"),
            "test_loss": ref.metrics.get(h, {}).get("test_loss"),
            "round_time_s": ref.metrics.get(h, {}).get("round_time_s"),
            "updates": ref.updates.get(h),
        }
        for h in range(1, min(ref.height, rounds) + 1)
    ]
    summary = {
        "ok": bool(same),
        "nodes": nodes,
        "rounds": rounds,
        "aggregator": aggregator,
        "wall_time_s": round(wall, 2),
        "per_round": per_round,
        "final_model_hash": hashes,
        "identical_model_hashes": bool(same),
        "home": str(home),
    }
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        acc = [r["test_accuracy"] for r in per_round if r["test_accuracy"] is not None]
        times = sorted(r["round_time_s"] for r in per_round if r["round_time_s"] is not None)
        console.print()
        console.print("[bold]test accuracy per round[/bold]")
        console.print(accuracy_chart(acc))
        console.print()
        if acc:
            console.print(f"final test accuracy: [bold]{acc[-1]:.3f}[/bold] after {len(acc)} rounds")
        if times:
            console.print(f"median round time: {times[len(times) // 2]:.3f} s; wall time {wall:.1f} s")
        for name, mh in hashes.items():
            console.print(f"  {name}: model {mh[:16] if mh else 'missing'}")
        console.print(
            "[green]every node holds the identical model[/green]" if same else "[red]nodes disagree or did not finish[/red]"
        )
        console.print(f"homes kept in {home}: try `flnode chain show --home {home}/node0` and `flnode chain verify --home {home}/node0`")
    if not same:
        raise typer.Exit(1)


def _fill_metrics(view: NodeView, h: int) -> None:
    from flnode.node.chain.store import ChainStore

    store = ChainStore.open(view.home / "data" / "chain.sqlite", readonly=True)
    try:
        view.metrics[h] = store.get_metrics(h) or {}
    finally:
        store.close()
