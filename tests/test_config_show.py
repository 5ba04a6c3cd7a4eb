"""`flnode config show` through typer's CliRunner, on a small app built with `config_cmd.register`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from flnode.cli import config_cmd
from flnode.node.config import FIELDS, NodeConfig, write_config
from typer.testing import CliRunner

PEER = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in FIELDS.values():
        monkeypatch.delenv(spec.env, raising=False)


@pytest.fixture
def app() -> typer.Typer:
    a = typer.Typer()

    @a.command()
    def other() -> None:  # a second command so `config` stays a sub-group, as in the real app
        pass

    config_cmd.register(a)
    return a


@pytest.fixture
def home(tmp_path: Path) -> Path:
    write_config(tmp_path, NodeConfig(moniker="node3", bootstrap=(f"/dns4/node0/tcp/26656/p2p/{PEER}",)))
    return tmp_path


def _run(app: typer.Typer, args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, args, env=env)
    return r.exit_code, r.stdout, r.stderr


def test_show_json_reports_value_and_source_of_each_setting(app: typer.Typer, home: Path) -> None:
    code, out, err = _run(
        app,
        [
            "config",
            "show",
            "--home",
            str(home),
            "--json",
            "--listen",
            "/ip4/0.0.0.0/tcp/1",
            "--listen",
            "/ip4/0.0.0.0/tcp/2",
            "--log-level",
            "debug",
        ],
        env={
            "FLNODE_LOG_FORMAT": "json",
            "FLNODE_ANNOUNCE": "/dns4/node3/tcp/26656",
            "FLNODE_LOG_LEVEL": "error",
        },
    )
    assert code == 0, err
    data = json.loads(out)
    s = data["settings"]
    assert list(s) == list(FIELDS)
    assert s["listen"] == {
        "value": ["/ip4/0.0.0.0/tcp/1", "/ip4/0.0.0.0/tcp/2"],
        "source": "flag",
        "env": "FLNODE_LISTEN",
    }
    assert (s["log_level"]["value"], s["log_level"]["source"]) == ("debug", "flag")  # flag beats env
    assert (s["log_format"]["value"], s["log_format"]["source"]) == ("json", "env")
    assert (s["announce"]["value"], s["announce"]["source"]) == (["/dns4/node3/tcp/26656"], "env")
    assert (s["moniker"]["value"], s["moniker"]["source"]) == ("node3", "file")
    assert s["participate"] == {"value": True, "source": "file", "env": "FLNODE_PARTICIPATE"}
    assert data["config_file_exists"] is True
    assert data["paths"]["chain_db"] == str(home / "data" / "chain.sqlite")


def test_show_defaults_without_a_config_file(app: typer.Typer, tmp_path: Path) -> None:
    code, out, _ = _run(app, ["config", "show", "--home", str(tmp_path), "--json"], env={})
    assert code == 0
    data = json.loads(out)
    assert data["config_file_exists"] is False
    assert {v["source"] for v in data["settings"].values()} == {"default"}


def test_show_table(app: typer.Typer, home: Path) -> None:
    code, out, _ = _run(
        app,
        ["config", "show", "--home", str(home), "--bootstrap", f"/ip4/10.0.0.9/tcp/26656/p2p/{PEER}"],
        env={"FLNODE_METRICS_LISTEN": "0.0.0.0:26660", "COLUMNS": "200"},
    )
    assert code == 0
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
        for line in out.splitlines()
        if line.count("│") >= 5
    }
    assert rows["moniker"] == ["node3", "file", "FLNODE_MONIKER"]
    assert rows["bootstrap"] == [f"/ip4/10.0.0.9/tcp/26656/p2p/{PEER}", "flag", "FLNODE_BOOTSTRAP"]
    assert rows["metrics_listen"] == ["0.0.0.0:26660", "env", "FLNODE_METRICS_LISTEN"]
    assert rows["log_level"] == ["info", "file", "FLNODE_LOG_LEVEL"]
    assert set(rows) == set(FIELDS)


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--log-level", "loud"], {}, "bad log_level from flag --log-level"),
        (["--bootstrap", "/ip4/1.2.3.4/tcp/1"], {}, "bad bootstrap from flag --bootstrap"),
        ([], {"FLNODE_LISTEN": "/ip4/300.0.0.1/tcp/1"}, "bad listen from env FLNODE_LISTEN"),
    ],
)
def test_show_errors_are_one_line_exit_2(
    app: typer.Typer, home: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    code, out, err = _run(app, ["config", "show", "--home", str(home), *args], env=env)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_show_bad_file_and_missing_home(app: typer.Typer, home: Path, tmp_path: Path) -> None:
    (home / "config.toml").write_text('log_levle = "debug"\n')
    code, _, err = _run(app, ["config", "show", "--home", str(home)])
    assert code == 2 and "unknown setting 'log_levle'" in err and err.count("\n") == 1
    code, _, err = _run(app, ["config", "show", "--home", str(tmp_path / "nope")])
    assert code == 2 and "does not exist" in err


def test_show_overrides_match_start_flags() -> None:
    """config show must accept exactly the overrides `flnode start` does, so it predicts start's configuration."""
    from flnode.cli.main import app as real_app

    root = typer.main.get_command(real_app)
    start = root.commands.get("start")  # type: ignore[attr-defined]
    assert start is not None, "`flnode start` is missing"
    show = root.commands["config"].commands["show"]  # type: ignore[attr-defined]

    def opts(cmd: typer.core.TyperCommand) -> set[str]:
        return {o for p in cmd.params for o in p.opts}

    assert opts(start) - {"--home"} <= opts(show)
    assert {"--listen", "--announce", "--bootstrap", "--log-level"} <= opts(show)
    assert {o for o in opts(show) - {"--home", "--json", "--help"}} <= {s.flag for s in FIELDS.values()}
