"""Node configuration: one flat TOML file per home, overridable by environment and flags.

Precedence, highest first: command-line flag > environment variable (``FLNODE_<NAME>``) > ``HOME/config.toml`` >
built-in default. ``load_config`` reports, per setting, which of those four supplied the effective value, so
``flnode config show`` can explain a deployment. Every error is a ``ConfigError`` whose message is one line naming the
setting and where the bad value came from.

Environment rules: list settings are comma separated; an *empty* variable counts as unset (as in viper, which CometBFT
uses), so a compose file can pass ``FLNODE_BOOTSTRAP: ${VAR:-}`` without wiping the file's value.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

CONFIG_FILE = "config.toml"
ENV_PREFIX = "FLNODE_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")

Source = Literal["default", "file", "env", "flag"]


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or has a bad value. The message is one line."""


@dataclass(frozen=True)
class NodeConfig:
    moniker: str = "node"  # human name (matches the genesis validator name)
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/26656",)  # libp2p multiaddrs to listen on
    announce: tuple[str, ...] = ()  # addresses advertised to peers (NAT, containers, netns)
    bootstrap: tuple[str, ...] = ()  # full multiaddrs with /p2p/<peer id>
    data_dir: str = "data"  # relative to home unless absolute
    metrics_listen: str = ""  # e.g. "127.0.0.1:26660"; empty = off
    http_listen: str = ""  # web explorer + API + /metrics, e.g. "127.0.0.1:26680"; empty = off
    # TCP port of the direct consensus link (node/net/direct.py) on the listen address; 0 = any free port,
    # -1 = off (consensus frames over libp2p streams only)
    direct_port: int = 0
    # Validators' direct link addresses known in advance, "<peer id>@<host>:<port>" (testnet init writes them):
    # with them a validator links up and commits before it has started libp2p at all (a quicker start-up).
    direct_peers: tuple[str, ...] = ()
    # libp2p connections (gossip, blobs, sync) this node dials up to; 0 = every bootstrap peer. Consensus does not
    # need a full libp2p mesh: direct links find each other through the neighbours' directories. Others dial us
    # too, so the graph's degree is about twice this. Each connection costs CPU every second (gossip heartbeat,
    # identify, pings): at 16 nodes, 16 instead of 4 cost 25 % more CPU per height.
    p2p_max_peers: int = 4
    log_level: str = "info"
    log_format: str = "text"  # text | json
    data_path: str = ""  # optional own .npz (x, y) instead of the genesis data set shard
    participate: bool = True  # train and publish updates (validators may opt out)
    trainer: str = ""  # "pkg.module:make_client" (a Flower-style client); empty = the genesis' trainer or built-in
    # Heights of update/model blobs kept; 0 = all. Default 0: there is no state sync yet, so a node joining later
    # replays from genesis and needs every old blob from some peer; prune only where others keep them.
    blob_retention_heights: int = 0


# ---------------------------------------------------------------- validation of single values

_PORT = r"(?:0|[1-9][0-9]{0,4})"
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?$"
)
_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{8,128}$")


def _check_host(proto: str, host: str) -> str | None:
    try:
        if proto == "ip4":
            ipaddress.IPv4Address(host)
        elif proto == "ip6":
            ipaddress.IPv6Address(host)
        elif not _DNS_NAME.match(host):
            return f"{host!r} is not a DNS name"
    except ValueError:
        return f"{host!r} is not an {proto} address"
    return None


def check_multiaddr(addr: str, *, peer_id: bool) -> None:
    """Shape check of ``/ip4|ip6|dns4|dns6|dns/<host>/tcp/<port>`` (+ ``/p2p/<peer id>`` iff ``peer_id``).

    Raises ``ValueError`` with the reason. Deliberately strict: a typo here otherwise surfaces as a peer that is
    silently never dialled.
    """
    shape = "/ip4/<addr>/tcp/<port>" + ("/p2p/<peer id>" if peer_id else "")
    parts = addr.split("/")
    want = 7 if peer_id else 5
    if len(parts) != want or parts[0] != "" or parts[3] != "tcp" or (peer_id and parts[5] != "p2p"):
        raise ValueError(f"{addr!r} is not a multiaddr like {shape}")
    proto, host, port = parts[1], parts[2], parts[4]
    if proto not in ("ip4", "ip6", "dns4", "dns6", "dns"):
        raise ValueError(f"{addr!r}: unsupported protocol /{proto} (use ip4, ip6, dns4, dns6 or dns)")
    bad = _check_host(proto, host)
    if bad:
        raise ValueError(f"{addr!r}: {bad}")
    if not re.fullmatch(_PORT, port) or int(port) > 65535:
        raise ValueError(f"{addr!r}: bad TCP port {port!r}")
    if peer_id and not _BASE58.match(parts[6]):
        raise ValueError(f"{addr!r}: {parts[6]!r} is not a base58 peer id")


def _v_direct_port(v: Any) -> None:
    if not -1 <= v <= 65535:
        raise ValueError("must be -1 (off), 0 (any free port) or a TCP port")


def parse_direct_peer(entry: str) -> tuple[str, str, int]:
    """'<peer id>@<host>:<port>' -> (peer id, host, port); ValueError says what is wrong."""
    peer, at, addr = entry.partition("@")
    host, colon, port = addr.rpartition(":")
    if not at or not colon or not host or not _BASE58.match(peer):
        raise ValueError(f"{entry!r}: expected <peer id>@<host>:<port>")
    if not re.fullmatch(_PORT, port) or not 0 < int(port) <= 65535:
        raise ValueError(f"{entry!r}: bad TCP port {port!r}")
    return peer, host.strip("[]"), int(port)


def _v_direct_peers(v: Any) -> None:
    for e in v:
        parse_direct_peer(e)


def _v_listen(v: Any) -> None:
    for a in v:
        check_multiaddr(a, peer_id=False)


def _v_bootstrap(v: Any) -> None:
    for a in v:
        check_multiaddr(a, peer_id=True)


def _v_moniker(v: Any) -> None:
    if not v or not v.isprintable() or v != v.strip() or len(v) > 64:
        raise ValueError(f"{v!r} must be 1-64 printable characters without surrounding spaces")


def _v_nonempty(v: Any) -> None:
    if not v:
        raise ValueError("must not be empty")


def _v_metrics(v: Any) -> None:
    if v == "":
        return
    host, sep, port = v.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not re.fullmatch(_PORT, port) or int(port) > 65535:
        raise ValueError(f"{v!r} is not host:port (e.g. 127.0.0.1:26660) or empty")
    bad = _check_host("ip6" if ":" in host else "dns", host)
    if bad:
        raise ValueError(f"{v!r}: {bad}")


def _v_choice(choices: tuple[str, ...]) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if v not in choices:
            raise ValueError(f"{v!r} is not one of {', '.join(choices)}")

    return check


def _v_nonnegative(v: Any) -> None:
    if v < 0:
        raise ValueError(f"{v} must be 0 or more")


def _v_retention(v: Any) -> None:
    if v < 0:
        raise ValueError(f"{v} must be 0 (keep all) or a number of heights")


def _v_trainer(v: Any) -> None:
    module, sep, attr = v.partition(":")
    if v and not (sep and module and attr.isidentifier()):
        raise ValueError(f"{v!r} is not 'package.module:factory'")


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: type  # str, tuple (of str), bool or int
    env: str
    flag: str
    help: str
    validate: Callable[[Any], None] | None = None


def _spec(name: str, kind: type, help: str, validate: Callable[[Any], None] | None = None) -> FieldSpec:
    return FieldSpec(name, kind, ENV_PREFIX + name.upper(), "--" + name.replace("_", "-"), help, validate)


FIELDS: dict[str, FieldSpec] = {
    s.name: s
    for s in (
        _spec("moniker", str, "Human-readable node name (the genesis validator name).", _v_moniker),
        _spec("listen", tuple, "libp2p multiaddrs to listen on, e.g. /ip4/0.0.0.0/tcp/26656.", _v_listen),
        _spec(
            "announce",
            tuple,
            "Addresses advertised to peers (NAT, containers); empty = the listen addresses.",
            _v_listen,
        ),
        _spec(
            "bootstrap",
            tuple,
            "Peers to dial at start: /ip4|dns4/<host>/tcp/<port>/p2p/<peer id>.",
            _v_bootstrap,
        ),
        _spec(
            "data_dir",
            str,
            "Chain store and runtime files; relative to the home unless absolute.",
            _v_nonempty,
        ),
        _spec("metrics_listen", str, "host:port of the Prometheus text endpoint; empty = off.", _v_metrics),
        _spec(
            "http_listen",
            str,
            "host:port of the read-only web explorer, JSON API and /metrics; empty = off (keep it on 127.0.0.1).",
            _v_metrics,
        ),
        _spec(
            "direct_port",
            int,
            "TCP port of the direct, encrypted consensus link between validators; 0 = any free port, -1 = off.",
            _v_direct_port,
        ),
        _spec(
            "direct_peers",
            tuple,
            "Validators' direct link addresses, <peer id>@<host>:<port>: consensus links up without waiting for "
            "libp2p (which then starts after the first commit).",
            _v_direct_peers,
        ),
        _spec(
            "p2p_max_peers",
            int,
            "Bootstrap peers dialled until this many libp2p connections are up; 0 = all of them.",
            _v_nonnegative,
        ),
        _spec("log_level", str, "debug | info | warning | error | critical.", _v_choice(LOG_LEVELS)),
        _spec("log_format", str, "text | json (one JSON object per line).", _v_choice(LOG_FORMATS)),
        _spec(
            "data_path",
            str,
            "Own .npz (x, y) to train on instead of the genesis data set shard; empty = shard.",
        ),
        _spec("participate", bool, "Train and publish updates each round (a validator may opt out)."),
        _spec(
            "trainer",
            str,
            "Own training code, 'pkg.module:make_client' (a Flower-style NumPyClient); empty = the genesis' trainer.",
            _v_trainer,
        ),
        _spec(
            "blob_retention_heights",
            int,
            "Keep the update and model blobs of this many recent heights (older ones are deleted); 0 = keep all.",
            _v_retention,
        ),
    )
}
assert list(FIELDS) == [f.name for f in fields(NodeConfig)]  # one source of truth for order and names

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _where(source: Source, spec: FieldSpec, file: Path) -> str:
    if source == "env":
        return f"env {spec.env}"
    if source == "flag":
        return f"flag {spec.flag}"
    if source == "file":
        return f"file {file}"
    return "default"


def _coerce(spec: FieldSpec, raw: Any, source: Source) -> Any:
    """Turn a raw value into the field's type; strings from env (and flags) are parsed, TOML types are strict."""
    if spec.kind is tuple:
        if isinstance(raw, str) and source in ("env", "flag"):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if isinstance(raw, list | tuple) and all(isinstance(x, str) for x in raw):
            return tuple(raw)
        raise ValueError(f"must be a list of strings, got {_show(raw)}")
    if spec.kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and source in ("env", "flag"):
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"{raw!r} is not a boolean (true/false, 1/0, yes/no, on/off)")
        raise ValueError(f"must be a boolean, got {_show(raw)}")
    if spec.kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and source in ("env", "flag") and re.fullmatch(r"\s*-?[0-9]+\s*", raw):
            return int(raw)  # the field's validator decides which range (direct_port allows -1)
        raise ValueError(f"must be an integer, got {_show(raw)}")
    if isinstance(raw, str):
        value = raw.strip() if source == "env" else raw
        return value.lower() if spec.name in ("log_level", "log_format") else value
    raise ValueError(f"must be a string, got {_show(raw)}")


def _show(raw: Any) -> str:
    return f"{type(raw).__name__} {raw!r}"


@dataclass(frozen=True)
class EffectiveConfig:
    config: NodeConfig
    sources: dict[str, str]  # setting -> "default" | "file" | "env" | "flag"
    config_file: Path | None = None  # the file read, None when the home has none


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw table of a config file ({} if absent); ConfigError on bad TOML or unknown keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key in data:
        if key not in FIELDS:
            raise ConfigError(f"unknown setting {key!r} in file {path} (known: {', '.join(FIELDS)})")
    return data


def load_config(
    home: Path, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> EffectiveConfig:
    """Effective configuration of the node at ``home``: flag > env > ``home/config.toml`` > default.

    ``flags`` maps setting names to values; ``None`` values mean "flag not given". ``env`` defaults to nothing (pass
    ``os.environ`` explicitly) so library callers and tests never pick up the caller's environment by accident.
    """
    path = Path(home).expanduser() / CONFIG_FILE
    layers: list[tuple[Source, Mapping[str, Any]]] = [("file", read_config_file(path))]
    env = env or {}
    layers.append(("env", {n: env[s.env] for n, s in FIELDS.items() if env.get(s.env, "").strip() != ""}))
    flags = dict(flags or {})
    for key in flags:
        if key not in FIELDS:
            raise ConfigError(f"unknown setting {key!r} given as a flag")
    layers.append(("flag", {k: v for k, v in flags.items() if v is not None}))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {n: "default" for n in FIELDS}
    for source, layer in layers:
        for name, raw in layer.items():
            spec = FIELDS[name]
            try:
                value = _coerce(spec, raw, source)
                if spec.validate is not None:
                    spec.validate(value)
            except ValueError as exc:
                raise ConfigError(f"bad {name} from {_where(source, spec, path)}: {exc}") from None
            values[name] = value
            sources[name] = source
    return EffectiveConfig(replace(NodeConfig(), **values), sources, path if path.exists() else None)


# ---------------------------------------------------------------- writing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        # JSON string escapes are a subset of TOML basic-string escapes
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_config(config: NodeConfig) -> str:
    """The config as commented TOML, keys in ``FIELDS`` order."""
    out = [
        "# flnode node configuration.",
        "# Precedence: command-line flag > environment variable > this file > built-in default.",
        "# `flnode config show --home <home>` prints the effective value of each setting and its source.",
        "",
    ]
    for name, spec in FIELDS.items():
        out.append(f"# {spec.help}")
        out.append(f"# env: {spec.env}" + (" (comma separated)" if spec.kind is tuple else ""))
        out.append(f"{name} = {_toml_value(getattr(config, name))}")
        out.append("")
    return "\n".join(out)


def write_config(home: Path, config: NodeConfig) -> Path:
    """Write ``home/config.toml`` atomically (temp file + rename) and return its path."""
    for name, spec in FIELDS.items():
        if spec.validate is not None:
            try:
                spec.validate(getattr(config, name))
            except ValueError as exc:
                raise ConfigError(f"bad {name} to write: {exc}") from None
    home = Path(home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    path = home / CONFIG_FILE
    tmp = path.with_suffix(".toml.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps_config(config))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- home layout


@dataclass(frozen=True)
class HomePaths:
    home: Path
    config: Path  # home/config.toml
    genesis: Path  # home/genesis.json
    node_key: Path  # home/node_key.json (0600)
    data_dir: Path  # home/data unless data_dir is absolute
    chain_db: Path  # data/chain.sqlite
    lock: Path  # data/LOCK (held by the running daemon)
    status: Path  # data/status.json (written by the running daemon, read by `flnode status`)
    data_file: Path | None  # data_path resolved against the home, None when unset
    sign_state: Path  # home/sign_state.json: the last signature's position, kept beside the key, not the data


def home_paths(home: Path, config: NodeConfig) -> HomePaths:
    home = Path(home).expanduser()
    data_dir = home / Path(config.data_dir).expanduser()  # an absolute data_dir replaces the home prefix
    data_file = home / Path(config.data_path).expanduser() if config.data_path else None
    return HomePaths(
        home=home,
        config=home / CONFIG_FILE,
        genesis=home / "genesis.json",
        node_key=home / "node_key.json",
        data_dir=data_dir,
        chain_db=data_dir / "chain.sqlite",
        lock=data_dir / "LOCK",
        status=data_dir / "status.json",
        data_file=data_file,
        sign_state=home / "sign_state.json",
    )
