"""`flnode init`, `flnode testnet init`, `flnode start`, `flnode status`."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import fail, user_errors
from .options import (
    AGGREGATOR_HELP,
    AnnounceOpt,
    BootstrapOpt,
    DataPathOpt,
    HttpOpt,
    ListenOpt,
    LogFormatOpt,
    LogLevelOpt,
    MetricsOpt,
    config_flags,
)
from .testnet import _task_and_rules, aggregator_rules, create_testnet, make_genesis, open_membership_rules

HomeOpt = Annotated[Path, typer.Option("--home", help="Node home directory.")]
TrainerOpt = Annotated[str, typer.Option("--trainer", help="Own client, 'pkg.module:make_client' (Flower NumPyClient shape).")]

testnet_app = typer.Typer(help="Make a local or multi-host test network.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("start")(start)
    app.command("status")(status)
    app.add_typer(testnet_app, name="testnet")


# ---------------------------------------------------------------- init


@user_errors
def init(
    home: HomeOpt,
    moniker: Annotated[str, typer.Option(help="Human-readable node name.")] = "node0",
    chain_id: Annotated[str, typer.Option(help="Chain id of the single-node genesis written here.")] = "flnode-local",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 26656,
    force: Annotated[bool, typer.Option(help="Overwrite an existing home.")] = False,
) -> None:
    """Create a node home: key (0600), config.toml and a single-validator genesis."""
    from flnode.node.config import NodeConfig, home_paths, write_config
    from flnode.protocol.crypto import NodeKey

    home = home.expanduser()
    cfg = NodeConfig(moniker=moniker, listen=(f"/ip4/0.0.0.0/tcp/{port}",))
    paths = home_paths(home, cfg)
    if paths.node_key.exists() and not force:
        fail(f"{home} already has a node key; use --force to overwrite")
    home.mkdir(parents=True, exist_ok=True)
    key = NodeKey.generate()
    key.save(paths.node_key)
    paths.sign_state.unlink(missing_ok=True)  # a new key has signed nothing yet
    write_config(home, cfg)
    task, rules = _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 2000)
    make_genesis(chain_id, [(moniker, key.public_key)], task, rules).save(paths.genesis)
    from flnode.node.net import peer_id_of

    typer.echo(f"initialised {home}\n  peer id: {peer_id_of(key.public_key)}\n  public key: {key.public_key.hex()}")


@testnet_app.command("init")
@user_errors
def testnet_init(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write node0 .. nodeN-1 homes.")] = Path("testnet"),
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=64)] = 4,
    chain_id: Annotated[str, typer.Option()] = "flnode-testnet",
    host: Annotated[str, typer.Option(help="IP address peers dial (all nodes on one machine).")] = "127.0.0.1",
    hosts: Annotated[str, typer.Option(help="Comma-separated IP per node (one machine each).")] = "",
    hostnames: Annotated[str, typer.Option(help="Comma-separated DNS names per node (compose/k8s).")] = "",
    listen_host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    base_port: Annotated[int, typer.Option(help="Port of node0; node i listens on base+i (0 = same port for all).")] = 26656,
    same_port: Annotated[bool, typer.Option(help="Every node uses base-port (one host or container each).")] = False,
    model: Annotated[str, typer.Option(help="logreg | mlp")] = "logreg",
    dataset: Annotated[str, typer.Option(help="digits | synthetic | path to .npz")] = "digits",
    partition: Annotated[str, typer.Option(help="iid | dirichlet")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet alpha for non-IID splits.")] = 0.5,
    aggregator: Annotated[str, typer.Option(help=AGGREGATOR_HELP)] = "robust",
    seed: Annotated[int, typer.Option()] = 0,
    norm_bound: Annotated[float, typer.Option(help="Max L2 norm of an update.")] = 100.0,
    local_epochs: Annotated[int, typer.Option()] = 1,
    learning_rate: Annotated[float, typer.Option()] = 0.1,
    collect_timeout_ms: Annotated[int, typer.Option(help="Proposer waits this long for updates at most.")] = 2000,
    trainer: TrainerOpt = "",
    force: Annotated[bool, typer.Option(help="Overwrite existing homes.")] = False,
    dp_mode: Annotated[str, typer.Option(help="Differential privacy: off | record (DP-SGD) | participant.")] = "off",
    dp_clip: Annotated[float, typer.Option(help="DP clip norm C (per example, or per update).")] = 1.0,
    dp_noise: Annotated[float, typer.Option(help="DP noise multiplier z.")] = 1.0,
    dp_sample_rate: Annotated[float, typer.Option(help="Record-level DP-SGD sampling rate q.")] = 0.05,
    dp_sampling: Annotated[str, typer.Option(help="poisson | fixed")] = "poisson",
    dp_delta: Annotated[float, typer.Option(help="DP delta.")] = 1e-5,
    dp_epsilon: Annotated[float, typer.Option(help="Every participant's epsilon budget (0: unlimited).")] = 0.0,
    dp_budget: Annotated[list[str] | None, typer.Option(help="NAME=EPSILON budget of one node (repeatable).")] = None,
    dp_participants: Annotated[int, typer.Option(help="Participants sharing the noise (0: all).")] = 0,
    admission: Annotated[str, typer.Option(help="Membership: genesis (fixed) | open | validators (> 2/3 vote).")] = "genesis",
    max_members: Annotated[int, typer.Option(help="Cap on members off genesis admission (0: 4 x nodes).")] = 0,
    max_samples: Annotated[int, typer.Option(help="Cap on an update's declared samples off genesis admission "
                                                  "(0: the largest validator's data shard).")] = 0,
    min_authors: Annotated[int, typer.Option(help="Distinct update authors a block that changes the model "
                                                  "needs.")] = 1,
) -> None:
    """Write N homes with one shared genesis and each other's addresses as bootstrap peers."""
    task, rules = _task_and_rules(model, dataset, partition, alpha, aggregator, seed, norm_bound, local_epochs,
                                  learning_rate, collect_timeout_ms, trainer)
    rules.update(aggregator_rules(aggregator, nodes))
    if dp_mode != "off":  # docs/PRIVACY.md
        budgets = {}
        for item in dp_budget or []:
            name, sep, eps = item.partition("=")
            try:
                budgets[name.strip()] = float(eps)
            except ValueError:
                fail(f"--dp-budget {item!r}: expected NAME=EPSILON")
            if not sep:
                fail(f"--dp-budget {item!r}: expected NAME=EPSILON")
        rules.update(dp_mode=dp_mode, dp_clip=dp_clip, dp_noise=dp_noise, dp_sample_rate=dp_sample_rate,
                     dp_sampling=dp_sampling, dp_delta=dp_delta, dp_epsilon_budget=dp_epsilon, dp_budgets=budgets,
                     dp_participants=dp_participants)
    if admission != "genesis" or max_members:  # later rules, hashed only when set
        rules.update(open_membership_rules(task, nodes, admission, max_members, max_samples))
    if min_authors != 1:
        rules.update(min_authors=min_authors)
    info = create_testnet(
        directory, nodes, chain_id=chain_id, host=host, hosts=_csv(hosts), hostnames=_csv(hostnames),
        listen_host=listen_host, base_port=base_port, same_port=same_port, task_rules=(task, rules), force=force,
    )
    for name, addr in info:
        typer.echo(f"{name}: {addr}")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# ---------------------------------------------------------------- start


@contextmanager
def _home_lock(lock_path: Path) -> Iterator[None]:
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(f"another flnode is running on this home (lock {lock_path} is held)")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def _check_ports_free(listen: tuple[str, ...]) -> None:
    """libp2p binds with SO_REUSEPORT, so two daemons could share a port silently (pitfall 4): check first."""
    for addr in listen:
        parts = addr.strip("/").split("/")
        if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp" and parts[3] != "0":
            fam = socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                # SO_REUSEADDR: connections of a killed predecessor in TIME_WAIT must not block a restart;
                # a live listener still makes bind + listen fail.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((parts[1], int(parts[3])))
                    s.listen()
                except OSError as exc:
                    fail(f"cannot listen on {addr}: {exc.strerror} (port in use?)")


def _check_http_free(name: str, hostport: str) -> None:
    """The web and metrics servers start inside the daemon: a taken port is one line here, not a traceback."""
    if not hostport:
        return
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
            s.listen()
        except OSError as exc:
            fail(f"cannot serve {name} on {hostport}: {exc.strerror} (port in use?)")


@user_errors
def start(
    home: HomeOpt,
    bootstrap: BootstrapOpt = None,
    listen: ListenOpt = None,
    announce: AnnounceOpt = None,
    metrics_listen: MetricsOpt = None,
    http_listen: HttpOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    data_path: DataPathOpt = None,
    trainer: Annotated[str | None, typer.Option("--trainer", help="Own client, 'pkg.module:make_client'.")] = None,
) -> None:
    """Run a node: join the network through its bootstrap peers and take part in every round."""
    import trio
    from flnode.node.app.participant import TrainerError
    from flnode.node.chain.store import ChainStore
    from flnode.node.config import home_paths, load_config
    from flnode.node.daemon import Daemon
    from flnode.node.logs import setup_logging
    from flnode.protocol.crypto import NodeKey
    from flnode.protocol.genesis import Genesis

    home = home.expanduser()
    if not home.is_dir():
        fail(f"home {home} does not exist (run `flnode init --home {home}` first)")
    flags = config_flags(bootstrap=bootstrap, listen=listen, announce=announce, metrics_listen=metrics_listen,
                         http_listen=http_listen, log_level=log_level, log_format=log_format, data_path=data_path,
                         trainer=trainer)
    eff = load_config(home, flags, os.environ)
    cfg = eff.config
    paths = home_paths(home, cfg)
    setup_logging(cfg.log_level, cfg.log_format)
    genesis = Genesis.load(paths.genesis)
    key = NodeKey.load(paths.node_key)
    with _home_lock(paths.lock):
        _check_ports_free(cfg.listen)
        _check_http_free("http_listen", cfg.http_listen)
        _check_http_free("metrics_listen", cfg.metrics_listen)
        store = ChainStore.open(paths.chain_db, genesis_hash=genesis.hash())
        try:
            try:
                daemon = Daemon(genesis, key, cfg, store, status_path=paths.status, data_file=paths.data_file,
                                sign_state_path=paths.sign_state)
            except TrainerError as exc:
                fail(f"cannot load the trainer: {exc.line}")

            async def main() -> None:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(daemon.run)
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for sig in signals:
                            import logging

                            logging.getLogger("flnode").info("shutting down", extra={"signal": signal.Signals(sig).name})
                            nursery.cancel_scope.cancel()
                            break

            _run_profiled(main, os.environ.get("FLNODE_PROFILE_DIR"), cfg.moniker)
        finally:
            store.close()


def _run_profiled(main: Any, profile_dir: str | None, name: str) -> None:
    """trio.run(main); with FLNODE_PROFILE_DIR set, under cProfile counting the event loop thread's CPU (consensus,
    checks and the network run there; the store and hashing threads are not in it), its stats written to
    <dir>/<moniker>.prof on exit (bench_scale --profile reads them)."""
    import trio

    if not profile_dir:
        trio.run(main)
        return
    import cProfile
    import time

    prof = cProfile.Profile(time.thread_time)  # CPU of the loop's thread: waiting in epoll costs nothing
    try:
        prof.runcall(trio.run, main)
    finally:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(Path(profile_dir) / f"{name or os.getpid()}.prof"))


# ---------------------------------------------------------------- status


@user_errors
def status(
    home: HomeOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show a node's height, peers and model hash (works while the node runs). Exit 1 if it is not running."""
    from flnode.node.chain.store import ChainStore
    from flnode.node.config import home_paths, load_config
    from flnode.protocol.genesis import Genesis

    home = home.expanduser()
    if not home.is_dir():
        fail(f"home {home} does not exist")
    cfg = load_config(home, {}, os.environ).config
    paths = home_paths(home, cfg)
    genesis = Genesis.load(paths.genesis)
    info: dict[str, Any] = {"home": str(home), "chain_id": genesis.chain_id, "running": False, "height": 0}
    if paths.chain_db.exists():
        store = ChainStore.open(paths.chain_db, readonly=True)
        try:
            info["height"] = store.latest_height()
            if info["height"] > 0:
                st = store.get_state(info["height"])
                info["model_hash"] = st.model_hash.hex()
                m = store.get_metrics(info["height"]) or {}
                if "test_accuracy" in m:
                    info["test_accuracy"] = m["test_accuracy"]
                if genesis.rules.dp_mode != "off":  # this node's epsilon, as the chain accounts it (docs/PRIVACY.md)
                    from flnode.node.app import privacy

                    for r in privacy.report(genesis, st):
                        if r["name"] == cfg.moniker:
                            info.update(epsilon_spent=r["epsilon_spent"], epsilon_budget=r["epsilon_budget"],
                                        privacy=r["guarantee"] + (", budget spent" if r["exhausted"] else ""))
        finally:
            store.close()
    sp = paths.status
    if sp.exists():
        try:
            live = json.loads(sp.read_text())
        except (OSError, ValueError):
            live = {}
        alive = _pid_alive(int(live.get("pid", 0))) and time.time() - float(live.get("time", 0)) < 10
        info["running"] = alive
        if alive:
            for k in ("pid", "peer_id", "addrs", "peers", "consensus_height", "consensus_round"):
                info[k] = live.get(k)
    if as_json:
        typer.echo(json.dumps(info))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(show_header=False, box=None)
        for k, v in info.items():
            t.add_row(k, ", ".join(v) if isinstance(v, list) else str(v))
        Console().print(t)
    if not info["running"]:
        raise typer.Exit(1)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
