"""node/config.py: precedence flag > env > file > default for every setting, errors, write/load round trip."""

from __future__ import annotations

import os
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from flnode.node.config import (
    FIELDS,
    ConfigError,
    NodeConfig,
    dumps_config,
    home_paths,
    load_config,
    write_config,
)

PEER = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE"

# Four distinct valid values per setting: (default is NodeConfig()'s), file, env (as the string an env var holds),
# flag (as the CLI passes it), and the expected typed value for each of file/env/flag.
CASES: dict[str, tuple[Any, str, Any, tuple[Any, Any, Any]]] = {
    # name: (file value, env string, flag value, (expected file, expected env, expected flag))
    "moniker": ("from-file", "from-env", "from-flag", ("from-file", "from-env", "from-flag")),
    "listen": (
        ["/ip4/0.0.0.0/tcp/1000"],
        "/ip4/10.0.0.1/tcp/2000, /ip6/::/tcp/2001",
        ("/dns4/example.org/tcp/3000",),
        (
            ("/ip4/0.0.0.0/tcp/1000",),
            ("/ip4/10.0.0.1/tcp/2000", "/ip6/::/tcp/2001"),
            ("/dns4/example.org/tcp/3000",),
        ),
    ),
    "announce": (
        ["/ip4/192.0.2.1/tcp/26656"],
        "/dns4/node1/tcp/26656",
        ("/ip4/198.51.100.7/tcp/4000",),
        (("/ip4/192.0.2.1/tcp/26656",), ("/dns4/node1/tcp/26656",), ("/ip4/198.51.100.7/tcp/4000",)),
    ),
    "bootstrap": (
        [f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"],
        f"/dns4/node0/tcp/26656/p2p/{PEER},/dns4/node2/tcp/26656/p2p/{PEER}",
        (f"/dns/peer.example/tcp/9/p2p/{PEER}",),
        (
            (f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}",),
            (f"/dns4/node0/tcp/26656/p2p/{PEER}", f"/dns4/node2/tcp/26656/p2p/{PEER}"),
            (f"/dns/peer.example/tcp/9/p2p/{PEER}",),
        ),
    ),
    "data_dir": ("store", "/var/lib/flnode/data", "d3", ("store", "/var/lib/flnode/data", "d3")),
    "metrics_listen": (
        "127.0.0.1:26660",
        "0.0.0.0:9100",
        "[::1]:9",
        ("127.0.0.1:26660", "0.0.0.0:9100", "[::1]:9"),
    ),
    "http_listen": (
        "127.0.0.1:26680",
        "127.0.0.1:8080",
        "[::1]:80",
        ("127.0.0.1:26680", "127.0.0.1:8080", "[::1]:80"),
    ),
    "direct_port": (26700, "-1", 0, (26700, -1, 0)),
    "direct_peers": (
        [f"{PEER}@127.0.0.1:26700"],
        f"{PEER}@node0:26700,{PEER}@[::1]:9",
        (f"{PEER}@10.0.0.2:1",),
        ((f"{PEER}@127.0.0.1:26700",), (f"{PEER}@node0:26700", f"{PEER}@[::1]:9"), (f"{PEER}@10.0.0.2:1",)),
    ),
    "p2p_max_peers": (8, "0", 24, (8, 0, 24)),
    "log_level": ("warning", "DEBUG", "error", ("warning", "debug", "error")),
    "log_format": ("json", "text", "json", ("json", "text", "json")),
    "data_path": ("mine.npz", "/data/site.npz", "x.npz", ("mine.npz", "/data/site.npz", "x.npz")),
    "participate": (False, "yes", False, (False, True, False)),
    "trainer": ("a.b:make", "pkg.mod:client", "x:y", ("a.b:make", "pkg.mod:client", "x:y")),
    "blob_retention_heights": (64, "256", 8, (64, 256, 8)),
}


def _write_file(home: Path, table: dict[str, Any]) -> None:
    from flnode.node.config import _toml_value

    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        "".join(f"{k} = {_toml_value(tuple(v) if isinstance(v, list) else v)}\n" for k, v in table.items())
    )


def test_cases_cover_every_setting() -> None:
    assert set(CASES) == set(FIELDS) == {f.name for f in fields(NodeConfig)}
    for name, spec in FIELDS.items():
        assert spec.env == "FLNODE_" + name.upper()
        assert spec.flag == "--" + name.replace("_", "-")
        assert spec.help


@pytest.mark.parametrize("name", list(CASES))
def test_precedence_flag_env_file_default(tmp_path: Path, name: str) -> None:
    file_v, env_v, flag_v, (want_file, want_env, want_flag) = CASES[name]
    env = {FIELDS[name].env: env_v}
    default = getattr(NodeConfig(), name)

    eff = load_config(tmp_path)  # no file at all
    assert getattr(eff.config, name) == default and eff.sources[name] == "default" and eff.config_file is None

    _write_file(tmp_path, {name: file_v})
    eff = load_config(tmp_path)
    assert (getattr(eff.config, name), eff.sources[name]) == (want_file, "file")
    assert eff.config_file == tmp_path / "config.toml"
    assert all(src == "default" for k, src in eff.sources.items() if k != name)

    eff = load_config(tmp_path, env=env)
    assert (getattr(eff.config, name), eff.sources[name]) == (want_env, "env")

    eff = load_config(tmp_path, flags={name: flag_v}, env=env)
    assert (getattr(eff.config, name), eff.sources[name]) == (want_flag, "flag")

    # a flag given as None means "not given": env still wins over the file
    eff = load_config(tmp_path, flags={name: None}, env=env)
    assert eff.sources[name] == "env"
    # env without a file, flag without env
    (tmp_path / "config.toml").unlink()
    assert load_config(tmp_path, env=env).sources[name] == "env"
    assert load_config(tmp_path, flags={name: flag_v}).sources[name] == "flag"


def test_env_is_not_read_implicitly_and_empty_env_counts_as_unset(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("FLNODE_LOG_LEVEL", "debug")
    assert load_config(tmp_path).config.log_level == "info"  # only an explicit env mapping is used
    assert load_config(tmp_path, env=os.environ).config.log_level == "debug"
    _write_file(tmp_path, {"bootstrap": [f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"]})
    eff = load_config(tmp_path, env={"FLNODE_BOOTSTRAP": "", "FLNODE_LOG_LEVEL": "  "})
    assert eff.sources["bootstrap"] == "file" and eff.config.bootstrap == (
        f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}",
    )
    assert eff.sources["log_level"] == "default"
    # unrelated variables are ignored
    assert load_config(tmp_path, env={"FLNODE_HOME": "/x", "PATH": "/bin"}).sources["moniker"] == "default"


def test_flag_list_given_as_comma_string(tmp_path: Path) -> None:
    eff = load_config(tmp_path, flags={"listen": "/ip4/0.0.0.0/tcp/1,/ip4/0.0.0.0/tcp/2"})
    assert eff.config.listen == ("/ip4/0.0.0.0/tcp/1", "/ip4/0.0.0.0/tcp/2")


BAD: list[tuple[str, Any, str]] = [
    # (setting, bad value as an env string, text the message must contain)
    ("listen", "/ip4/1.2.3/tcp/1", "not an ip4 address"),
    ("listen", "/ip4/1.2.3.4/udp/1", "not a multiaddr"),
    ("listen", "/ip4/1.2.3.4/tcp/70000", "bad TCP port"),
    ("listen", "/ip4/1.2.3.4/tcp/1/p2p/" + PEER, "not a multiaddr"),
    ("listen", "/ipx/1.2.3.4/tcp/1", "unsupported protocol"),
    ("listen", "127.0.0.1:26656", "not a multiaddr"),
    ("announce", "/dns4/bad_host!/tcp/1", "not a DNS name"),
    ("announce", "/ip6/1.2.3.4/tcp/1", "not an ip6 address"),
    ("bootstrap", "/ip4/1.2.3.4/tcp/1", "/p2p/<peer id>"),
    ("bootstrap", "/ip4/1.2.3.4/tcp/1/p2p/0OIl", "not a base58 peer id"),
    ("bootstrap", "/ip4/1.2.3.4/tcp/1/ipfs/" + PEER, "not a multiaddr"),
    ("metrics_listen", "26660", "not host:port"),
    ("metrics_listen", "localhost:99999", "not host:port"),
    ("direct_port", "70000", "must be -1 (off), 0 (any free port) or a TCP port"),
    ("direct_peers", "127.0.0.1:26700", "expected <peer id>@<host>:<port>"),
    ("direct_peers", f"{PEER}@127.0.0.1:0", "bad TCP port"),
    ("direct_peers", "0OIl@127.0.0.1:1", "expected <peer id>@<host>:<port>"),
    ("log_level", "loud", "not one of debug, info"),
    ("log_format", "xml", "not one of text, json"),
    ("participate", "maybe", "not a boolean"),
    ("moniker", "tab\there", "printable"),
]


@pytest.mark.parametrize(("name", "value", "reason"), BAD)
def test_bad_values_name_setting_and_source(tmp_path: Path, name: str, value: Any, reason: str) -> None:
    spec = FIELDS[name]
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path, env={spec.env: value})
    msg = str(ei.value)
    assert "\n" not in msg and name in msg and f"env {spec.env}" in msg and reason in msg, msg

    flag_value = (value,) if spec.kind is tuple else value
    with pytest.raises(ConfigError, match=rf"bad {name} from flag {spec.flag}: .*{reason[:8]}"):
        load_config(tmp_path, flags={name: flag_value})

    file_value = [value] if spec.kind is tuple else value  # for participate: a string where TOML needs a bool
    _write_file(tmp_path, {name: file_value})
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and f"bad {name} from file {tmp_path / 'config.toml'}" in msg, msg


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('lisen = ["/ip4/0.0.0.0/tcp/1"]\n', "unknown setting 'lisen'"),
        ("[p2p]\nlisten = []\n", "unknown setting 'p2p'"),
        ('listen = "/ip4/0.0.0.0/tcp/1"\n', "bad listen from file .*must be a list of strings, got str"),
        ("listen = [1, 2]\n", "bad listen from file .*must be a list of strings"),
        ("participate = 1\n", "bad participate from file .*must be a boolean, got int"),
        ('participate = "true"\n', "bad participate from file .*must be a boolean, got str"),
        ("log_level = 3\n", "bad log_level from file .*must be a string, got int"),
        ("moniker = \n", "not valid TOML"),
    ],
)
def test_bad_file_contents(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match=reason) as ei:
        load_config(tmp_path)
    assert "\n" not in str(ei.value)


def test_unknown_flag_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'lstn'"):
        load_config(tmp_path, flags={"lstn": "x"})


def test_write_load_round_trip(tmp_path: Path) -> None:
    cfg = NodeConfig(
        moniker='Hôpital "Nord" \\ 1',
        listen=("/ip4/0.0.0.0/tcp/26656", "/ip6/::/tcp/26656"),
        announce=("/dns4/node1.example.org/tcp/26656",),
        bootstrap=(f"/dns4/node0/tcp/26656/p2p/{PEER}", f"/ip4/10.0.0.2/tcp/26656/p2p/{PEER}"),
        data_dir="/var/lib/flnode/data",
        metrics_listen="0.0.0.0:26660",
        log_level="debug",
        log_format="json",
        data_path="site.npz",
        participate=False,
    )
    path = write_config(tmp_path / "home", cfg)
    assert path == tmp_path / "home" / "config.toml"
    eff = load_config(tmp_path / "home")
    assert eff.config == cfg and set(eff.sources.values()) == {"file"}
    assert load_config(tmp_path / "home").config == cfg
    # stable order and comments: keys in FIELDS order, each preceded by its help and env var
    text = path.read_text()
    keys = [line.split(" = ")[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert keys == list(FIELDS)
    for spec in FIELDS.values():
        assert f"# env: {spec.env}" in text
    assert text == dumps_config(cfg)  # deterministic
    assert tomllib.loads(dumps_config(NodeConfig())) == {
        f.name: list(v) if isinstance(v := getattr(NodeConfig(), f.name), tuple) else v
        for f in fields(NodeConfig)
    }
    assert not list((tmp_path / "home").glob("*.tmp"))


def test_write_refuses_invalid_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bad listen"):
        write_config(tmp_path, NodeConfig(listen=("nope",)))
    assert not (tmp_path / "config.toml").exists()


def test_home_paths(tmp_path: Path) -> None:
    p = home_paths(tmp_path, NodeConfig())
    assert p.config == tmp_path / "config.toml"
    assert p.genesis == tmp_path / "genesis.json"
    assert p.node_key == tmp_path / "node_key.json"
    assert p.data_dir == tmp_path / "data"
    assert p.chain_db == tmp_path / "data" / "chain.sqlite"
    assert p.lock == tmp_path / "data" / "LOCK"
    assert p.data_file is None
    q = home_paths(tmp_path, NodeConfig(data_dir="/srv/flnode", data_path="x/site.npz"))
    assert q.data_dir == Path("/srv/flnode") and q.chain_db == Path("/srv/flnode/chain.sqlite")
    assert q.lock == Path("/srv/flnode/LOCK")
    assert q.data_file == tmp_path / "x" / "site.npz"
    assert home_paths(tmp_path, NodeConfig(data_path="/abs/site.npz")).data_file == Path("/abs/site.npz")
