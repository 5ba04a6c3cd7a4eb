"""`flnode config show`: every setting's effective value and where it came from (flag, env, file, default)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import fail, user_errors
from .options import (
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

config_app = typer.Typer(help="Inspect the node configuration.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")


def _display(value: Any) -> str:
    if isinstance(value, tuple):
        return "\n".join(value) if value else "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if value != "" else "(empty)"


@config_app.command("show")
@user_errors
def show(
    home: Annotated[Path, typer.Option("--home", help="Node home directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    # The same overrides `flnode start` accepts, so this shows exactly what start would run with.
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
    """Print each setting's effective value and its source: flag > env (FLNODE_*) > config.toml > default."""
    from flnode.node.config import FIELDS, home_paths, load_config

    home = home.expanduser()
    if not home.is_dir():
        fail(f"home {home} does not exist")
    flags = config_flags(bootstrap=bootstrap, listen=listen, announce=announce, metrics_listen=metrics_listen,
                         http_listen=http_listen, log_level=log_level, log_format=log_format, data_path=data_path,
                         trainer=trainer)
    eff = load_config(home, flags, os.environ)
    paths = home_paths(home, eff.config)
    settings = {
        name: {
            "value": list(v) if isinstance(v := getattr(eff.config, name), tuple) else v,
            "source": eff.sources[name],
            "env": spec.env,
        }
        for name, spec in FIELDS.items()
    }
    if as_json:
        out = {
            "home": str(home),
            "config_file": str(paths.config),
            "config_file_exists": eff.config_file is not None,
            "settings": settings,
            "paths": {
                "data_dir": str(paths.data_dir),
                "chain_db": str(paths.chain_db),
                "lock": str(paths.lock),
            },
        }
        typer.echo(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    note = "" if eff.config_file is not None else " (absent: defaults apply)"
    table = Table(title=f"flnode config: {paths.config}{note}", title_justify="left")
    table.add_column("setting", style="bold")
    table.add_column("value", overflow="fold")
    table.add_column("source")
    table.add_column("env var", style="dim")
    colour = {"flag": "magenta", "env": "cyan", "file": "green", "default": "dim"}
    for name, row in settings.items():
        src = str(row["source"])
        table.add_row(name, _display(getattr(eff.config, name)), f"[{colour[src]}]{src}[/]", str(row["env"]))
    Console(soft_wrap=True).print(table)
