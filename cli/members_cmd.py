"""`flnode join`, `flnode members`, `flnode admit`, `flnode remove`, `flnode leave` (open membership).

The commands that change membership queue a request in the node's data dir; the running node signs it with its
key at its current height and sends it until a block carries it (node/member_txs.py). `join` also runs the node.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import fail, user_errors
from .options import BootstrapOpt

HomeOpt = Annotated[Path, typer.Option("--home", help="Node home directory.")]


def register(app: typer.Typer) -> None:
    app.command("join")(join)
    app.command("members")(members)
    app.command("admit")(admit)
    app.command("refuse")(refuse)
    app.command("remove")(remove)
    app.command("leave")(leave)


def _home(home: Path) -> tuple[Any, Any, Any]:
    """(config, paths, genesis) of an existing home."""
    from flnode.node.config import home_paths, load_config
    from flnode.protocol.genesis import Genesis

    home = home.expanduser()
    if not home.is_dir():
        fail(f"home {home} does not exist (run `flnode init --home {home}` first)")
    cfg = load_config(home, {}, os.environ).config
    paths = home_paths(home, cfg)
    return cfg, paths, Genesis.load(paths.genesis)


def _latest_state(paths: Any, genesis: Any) -> Any:
    from flnode.node.app import genesis_state
    from flnode.node.chain.store import ChainStore

    if not paths.chain_db.exists():
        return genesis_state(genesis)
    store = ChainStore.open(paths.chain_db, readonly=True)
    try:
        h = store.latest_height()
        return store.light_state(h) if h > 0 else genesis_state(genesis)
    finally:
        store.close()


def _queue(paths: Any, intent: dict[str, Any]) -> Path:
    from flnode.node.member_txs import write_intent

    return write_intent(paths.data_dir, intent, time.time_ns())


def _check_policy(genesis: Any) -> None:
    if genesis.rules.admission == "genesis":
        fail("this chain's membership is fixed by its genesis (rules.admission = genesis)")


# ---------------------------------------------------------------- join


@user_errors
def join(
    home: HomeOpt,
    bootstrap: BootstrapOpt = None,
    role: Annotated[str, typer.Option(help="trainer | validator | both")] = "trainer",
    data: Annotated[Path | None, typer.Option("--data", help="Own .npz (x, y) to train on.")] = None,
    genesis_file: Annotated[Path | None, typer.Option("--genesis", help="The network's genesis.json (copied in).")] = None,
    samples: Annotated[int, typer.Option(help="Declared sample count (0: the size of the data).")] = 0,
    data_seed: Annotated[int | None, typer.Option(help="Picks the built-in data set's shard (default: from the key).")] = None,
    no_start: Annotated[bool, typer.Option("--no-start", help="Only queue the request; `flnode start` sends it.")] = False,
) -> None:
    """Ask a running network to admit this node: sync, send a signed join request, then take part once admitted."""
    from flnode.node.app.membership import shard_of
    from flnode.protocol.crypto import NodeKey
    from flnode.protocol.membership import Role

    if genesis_file is not None:
        from flnode.node.config import home_paths, load_config

        cfg0 = load_config(home.expanduser(), {}, os.environ).config
        shutil.copyfile(genesis_file, home_paths(home.expanduser(), cfg0).genesis)
    cfg, paths, genesis = _home(home)
    _check_policy(genesis)
    try:
        r = Role.parse(role)
    except ValueError as exc:
        fail(str(exc))
    key = NodeKey.load(paths.node_key)
    me = key.public_key
    state = _latest_state(paths, genesis)
    from flnode.node.member_txs import outbox_dir

    queued = any(p.name.endswith("-join.json") for p in outbox_dir(paths.data_dir).glob("*.json"))
    if me in genesis.powers or me in state.membership.members:
        typer.echo("already a member: starting the node")
    elif me in state.membership.requests or queued:
        typer.echo("join request already sent: starting the node, waiting for admission")
    else:
        seed = data_seed if data_seed is not None else int.from_bytes(me[:4], "big")
        n = samples
        if n <= 0 and r.trains:
            from flnode.node.app import participant_data

            index, parts = shard_of(genesis, seed)
            n = len(participant_data(genesis.task, parts, index, str(data.expanduser()) if data else None))
        path = _queue(paths, {"kind": "join", "role": r.name.lower(), "samples": max(1, n), "moniker": cfg.moniker,
                              "data_seed": seed})
        typer.echo(f"join request queued ({r.name.lower()}, {max(1, n)} samples, moniker {cfg.moniker}): {path.name}")
        typer.echo(f"the node signs and gossips it once synced; admission policy: {genesis.rules.admission}")
    if no_start:
        return
    from .node_cmd import start

    start(home, bootstrap=bootstrap, data_path=str(data.expanduser().resolve()) if data else None)


# ---------------------------------------------------------------- votes and leave


def _resolve(genesis: Any, state: Any, who: str) -> bytes:
    """A member or requester by moniker, or by (a prefix of) its public key in hex."""
    ms = state.membership
    names: dict[bytes, str] = {v.key_bytes: v.name for v in genesis.validators}
    names.update({k: m.moniker for k, m in ms.members.items()})
    names.update({k: t.moniker for k, (t, _) in ms.requests.items()})
    hits = [k for k, n in names.items() if n == who] or [k for k in names if k.hex().startswith(who.lower())]
    if len(who) == 64 and not hits:
        try:
            return bytes.fromhex(who)
        except ValueError:
            pass
    if len(hits) != 1:
        fail(f"{who!r} names {'no' if not hits else 'more than one'} member or join request")
    return hits[0]


def _vote(home: Path, kind: str, who: str) -> None:
    _, paths, genesis = _home(home)
    _check_policy(genesis)
    target = _resolve(genesis, _latest_state(paths, genesis), who)
    path = _queue(paths, {"kind": kind, "target": target.hex()})
    typer.echo(f"{kind} {who} ({target.hex()[:12]}) queued: {path.name}; the running node signs and sends it")


@user_errors
def admit(home: HomeOpt, who: Annotated[str, typer.Argument(help="Moniker or public key (hex prefix).")]) -> None:
    """Vote to admit a node that asked to join (a validator seat, or any join under policy `validators`):
    admitted at > 2/3 of the voting power."""
    _vote(home, "admit", who)


@user_errors
def refuse(home: HomeOpt, who: Annotated[str, typer.Argument(help="Moniker or public key (hex prefix).")]) -> None:
    """Vote against a join request: it is dropped once > 1/3 of the voting power refused it."""
    _vote(home, "refuse", who)


@user_errors
def remove(home: HomeOpt, who: Annotated[str, typer.Argument(help="Moniker or public key (hex prefix).")]) -> None:
    """Vote to remove a member (removed at > 2/3 of the voting power, from two heights later)."""
    _vote(home, "remove", who)


@user_errors
def leave(home: HomeOpt) -> None:
    """Leave the network (signed by this node; it stops counting two heights after the block that carries it)."""
    _, paths, genesis = _home(home)
    _check_policy(genesis)
    path = _queue(paths, {"kind": "leave"})
    typer.echo(f"leave queued: {path.name}; the running node signs and sends it")


# ---------------------------------------------------------------- members


def member_rows(genesis: Any, state: Any) -> list[dict[str, Any]]:
    """Everyone who is, was or asked to be a member, as the chain at `state` says."""
    from flnode.node.app import validator_powers

    ms, h = state.membership, state.height
    powers = validator_powers(genesis, state, h + 1)
    rows = []

    def status(k: bytes, since: int) -> str:
        end = ms.ended.get(k)
        if end is not None:
            return f"left at {end}" if end <= h + 1 else f"leaving at {end}"
        return "active" if since <= h + 1 else f"joining at {since}"

    for v in genesis.validators:
        k = v.key_bytes
        rows.append({"moniker": v.name, "key": k.hex(), "role": "both", "power": powers.get(k, 0),
                     "status": status(k, 1), "since": 1})
    for k, m in sorted(ms.members.items(), key=lambda kv: kv[1].since):
        rows.append({"moniker": m.moniker, "key": k.hex(), "role": m.role.name.lower(), "power": powers.get(k, 0),
                     "status": status(k, m.since), "since": m.since})
    total = sum(powers.values())
    for k, (t, b) in sorted(ms.requests.items()):
        votes = sum(powers.get(v, 0) for v in b.votes)
        rows.append({"moniker": t.moniker, "key": k.hex(), "role": _role(t.role), "power": 0,
                     "status": f"requested ({votes}/{total} power voted)", "since": None})
    for r in rows:
        k = bytes.fromhex(r["key"])
        r["reputation"], r["balance"] = state.reputation.get(k), state.balances.get(k)
        b = ms.removals.get(k)
        if b is not None:
            r["status"] += f", removal voted by {sum(powers.get(v, 0) for v in b.votes)}/{total} power"
    return rows


def _role(role: int) -> str:
    from flnode.protocol.membership import Role

    return Role(role).name.lower()


@user_errors
def members(
    home: HomeOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Who is in (role, voting power, status, since which height, reputation), and pending requests."""
    import json

    from flnode.node.member_txs import outbox_dir

    _, paths, genesis = _home(home)
    state = _latest_state(paths, genesis)
    rows = member_rows(genesis, state)
    queued = [p.name for p in sorted(outbox_dir(paths.data_dir).glob("*.json"))]
    if as_json:
        typer.echo(json.dumps({"height": state.height, "admission": genesis.rules.admission, "members": rows,
                               "queued": queued}))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"members at height {state.height} (admission: {genesis.rules.admission})")
    for col in ("moniker", "key", "role", "power", "status", "since", "reputation", "balance"):
        t.add_column(col)
    for r in rows:
        t.add_row(*(str(r[c])[:12] if c == "key" else str(r[c] if r[c] is not None else "-")
                    for c in ("moniker", "key", "role", "power", "status", "since", "reputation", "balance")))
    Console().print(t)
    for q in queued:
        typer.echo(f"queued here, not yet on chain: {q}")


def prepare_joiner(home: Path, genesis_file: Path, port: int, bootstrap: list[str], moniker: str, role: str,
                   data_seed: int) -> None:
    """A new home that asks to join when started (`flnode demo --trainers`): key, config, the network's genesis
    and a queued join request for its seed's shard of the built-in data."""
    from flnode.node.app import participant_data
    from flnode.node.app.membership import shard_of
    from flnode.node.config import NodeConfig, home_paths, write_config
    from flnode.protocol.crypto import NodeKey
    from flnode.protocol.genesis import Genesis

    cfg = NodeConfig(moniker=moniker, listen=(f"/ip4/127.0.0.1/tcp/{port}",), bootstrap=tuple(bootstrap))
    paths = home_paths(home, cfg)
    home.mkdir(parents=True, exist_ok=True)
    NodeKey.generate().save(paths.node_key)
    paths.sign_state.unlink(missing_ok=True)
    write_config(home, cfg)
    shutil.copyfile(genesis_file, paths.genesis)
    if paths.data_dir.exists():
        shutil.rmtree(paths.data_dir)
    genesis = Genesis.load(paths.genesis)
    index, parts = shard_of(genesis, data_seed)
    _queue(paths, {"kind": "join", "role": role, "moniker": moniker, "data_seed": data_seed,
                   "samples": len(participant_data(genesis.task, parts, index))})


def prepare_trainers(home: Path, validators: int, trainers: int, ports: list[int], bootstrap: list[str]) -> None:
    """`flnode demo --trainers N`: the validators only validate; N trainer homes ask to join when started."""
    from dataclasses import replace

    from flnode.node.config import load_config, write_config

    for i in range(validators):
        node = home / f"node{i}"
        write_config(node, replace(load_config(node).config, participate=False))
    for i in range(trainers):
        prepare_joiner(home / f"trainer{i}", home / "node0" / "genesis.json", ports[i], bootstrap, f"trainer{i}",
                       "trainer", i)
