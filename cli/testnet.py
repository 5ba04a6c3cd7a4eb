"""Homes and genesis of a local or test network: `flnode init`, `flnode testnet init` and `flnode demo` share
them (and tests and benches build networks with them)."""

from __future__ import annotations

import socket
from collections.abc import Container
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import fail


def free_ports(n: int, host: str = "127.0.0.1", besides: Container[int] = ()) -> list[int]:
    """n TCP ports free on `host` now, none of them in `besides`."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            if (port := s.getsockname()[1]) not in besides:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def make_genesis(
    chain_id: str, validators: list[tuple[str, bytes]], task_overrides: dict[str, Any], rule_overrides: dict[str, Any]
) -> Any:
    from flnode.node.app import initial_model
    from flnode.protocol.genesis import Genesis, RewardRules, Rules, TaskSpec, ValidatorInfo
    from flnode.protocol.tensors import tensors_hash

    task = replace(TaskSpec(), **task_overrides)
    if task.trainer and not task.params:  # a participant-supplied model: its names, shapes and initial values
        from flnode.node.app.tasks import trainer_task_spec

        try:
            task = trainer_task_spec(task, len(validators))
        except Exception as exc:  # noqa: BLE001 - user code: one line, not a traceback
            fail(f"trainer {task.trainer}: {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}")
    overrides = dict(rule_overrides)
    if isinstance(overrides.get("rewards"), dict):
        overrides["rewards"] = replace(RewardRules(), **overrides["rewards"])
    rules = replace(Rules(), **overrides)
    g = Genesis(
        chain_id=chain_id,
        genesis_time=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        validators=tuple(ValidatorInfo(name, pk.hex(), 1) for name, pk in validators),
        task=task,
        initial_model_hash=tensors_hash(initial_model(task)).hex(),
        rules=rules,
    )
    g.check()
    return g


def _task_and_rules(
    model: str, dataset: str, partition: str, alpha: float, aggregator: str, seed: int, norm_bound: float,
    local_epochs: int, learning_rate: float, collect_timeout_ms: int, trainer: str = "",
) -> tuple[dict[str, Any], dict[str, Any]]:
    task = {
        "model": model, "dataset": dataset, "partition": partition, "dirichlet_alpha": alpha, "seed": seed,
        "local_epochs": local_epochs, "learning_rate": learning_rate,
    }
    if trainer:  # the genesis records the trainer's parameters (make_genesis); "model" names it custom
        task.update(model="custom", trainer=trainer)
    rules = {"aggregator": aggregator, "norm_bound": norm_bound, "collect_timeout_ms": collect_timeout_ms}
    return task, rules


def aggregator_rules(aggregator: str, validators: int) -> dict[str, Any]:
    """The genesis rules an --aggregator choice stands for ("robust" is a rule set, the others one rule)."""
    if aggregator == "robust":
        return {"aggregator": "centered_clip_momentum", "mixing": "nnm", "krum_byzantine": max(1, (validators - 1) // 3)}
    return {"aggregator": aggregator}


def open_membership_rules(task: dict[str, Any], nodes: int, admission: str, max_members: int = 0,
                          max_samples: int = 0) -> dict[str, Any]:
    """The rules open membership needs: a member cap and a sample cap (by default the largest shard a genesis
    validator trains on, so no joiner outweighs one)."""
    if not max_samples:
        from flnode.node.app.limits import shard_sizes
        from flnode.protocol.genesis import TaskSpec

        spec = TaskSpec(**task)
        max_samples = max(*shard_sizes(spec, nodes), *shard_sizes(spec, max_members or 4 * nodes))
    return {"admission": admission, "max_members": max_members or 4 * nodes, "max_samples_per_update": max_samples}


def create_testnet(
    directory: Path,
    nodes: int,
    *,
    chain_id: str = "flnode-testnet",
    host: str = "127.0.0.1",
    hosts: list[str] | None = None,
    hostnames: list[str] | None = None,
    listen_host: str = "0.0.0.0",
    base_port: int = 26656,
    ports: list[int] | None = None,
    same_port: bool = False,
    task_rules: tuple[dict[str, Any], dict[str, Any]] | None = None,
    force: bool = False,
) -> list[tuple[str, str]]:
    """Create the homes; returns (name, bootstrap multiaddr) per node."""
    from flnode.node.config import NodeConfig, home_paths, write_config
    from flnode.node.net import peer_id_of
    from flnode.protocol.crypto import NodeKey


    hosts = hosts or []
    hostnames = hostnames or []
    for lst, what in ((hosts, "--hosts"), (hostnames, "--hostnames")):
        if lst and len(lst) != nodes:
            fail(f"{what} lists {len(lst)} entries for {nodes} nodes")
    directory = directory.expanduser()
    names = [f"node{i}" for i in range(nodes)]
    explicit_ports = ports is not None
    if ports is None:
        ports = [base_port if same_port else base_port + i for i in range(nodes)]
    keys = [NodeKey.generate() for _ in range(nodes)]
    addrs = []
    for i in range(nodes):
        pid = peer_id_of(keys[i].public_key)
        if hostnames:
            addrs.append(f"/dns4/{hostnames[i]}/tcp/{ports[i]}/p2p/{pid}")
        else:
            addrs.append(f"/ip4/{hosts[i] if hosts else host}/tcp/{ports[i]}/p2p/{pid}")
    # One machine (explicit ports on a loopback listen address: demo, tests, benches): fixed direct link ports,
    # so validators link up and commit before libp2p starts (NodeConfig.direct_peers). Elsewhere the direct
    # port stays "any free port", learned through libp2p neighbours.
    direct_ports = free_ports(nodes, listen_host, besides=set(ports)) if (
        explicit_ports and not hosts and not hostnames and listen_host.startswith("127.")) else []
    direct = [f"{peer_id_of(keys[i].public_key)}@{listen_host}:{direct_ports[i]}" for i in range(len(direct_ports))]
    task, rules = task_rules or _task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 2000)
    genesis = make_genesis(chain_id, list(zip(names, [k.public_key for k in keys], strict=True)), task, rules)
    for i, name in enumerate(names):
        home = directory / name
        cfg = NodeConfig(
            moniker=name,
            listen=(f"/ip4/{hosts[i] if hosts and listen_host == 'host' else listen_host}/tcp/{ports[i]}",),
            announce=(addrs[i].rsplit("/p2p/", 1)[0],) if (hosts or hostnames) else (),
            bootstrap=tuple(a for j, a in enumerate(addrs) if j != i),
            direct_port=direct_ports[i] if direct_ports else 0,
            direct_peers=tuple(d for j, d in enumerate(direct) if j != i),
        )
        paths = home_paths(home, cfg)
        if paths.node_key.exists() and not force:
            fail(f"{home} already exists; use --force to overwrite")
        home.mkdir(parents=True, exist_ok=True)
        keys[i].save(paths.node_key)
        paths.sign_state.unlink(missing_ok=True)  # a new key has signed nothing yet
        write_config(home, cfg)
        genesis.save(paths.genesis)
        if paths.data_dir.exists() and force:
            for f in paths.data_dir.iterdir():
                if f.is_file():
                    f.unlink()
    return list(zip(names, addrs, strict=True))
