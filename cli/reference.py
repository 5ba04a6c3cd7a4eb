"""The reference pages, generated from the code: every command with its options, and every node setting and
genesis rule with its default and comment. `python -m flnode.cli.reference DIR` writes them; a test keeps the
committed pages equal to what the code says."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

import typer


def _command_rows(cmd: Any, path: str) -> list[str]:
    out = [f"### `{path}`", "", (cmd.help or "").strip().split("\n\n")[0].replace("\n", " "), ""]
    params = [p for p in cmd.params if p.name != "help"]
    if params:
        out += ["| option | default | help |", "|---|---|---|"]
        for p in params:
            argument = p.param_type_name == "argument"
            names = f"`{p.name.upper()}` (argument)" if argument \
                else ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            default = p.default if not callable(p.default) else None
            shown = "" if default in (None, (), []) or argument else f"`{default}`"
            text = (getattr(p, "help", None) or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| {names} | {shown} | {text} |")
        out.append("")
    return out


def render_cli() -> str:
    from flnode.cli.main import app

    root = typer.main.get_command(app)
    lines = ["# Command reference", "", "Generated from the code by `python -m flnode.cli.reference docs/reference`.",
             ""]

    def walk(cmd: Any, path: str) -> None:
        if hasattr(cmd, "commands"):
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], f"{path} {name}")
        else:
            lines.extend(_command_rows(cmd, path))

    walk(root, "flnode")
    return "\n".join(lines).rstrip() + "\n"


def _field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's comment: the trailing one on its line, else the comment lines just above it."""
    src, start = inspect.getsourcelines(cls)
    comments: dict[str, str] = {}
    above: list[str] = []
    for node in ast.parse("".join(src)).body[0].body:  # type: ignore[attr-defined]
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        line = src[node.lineno - 1]
        trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        above = []
        i = node.lineno - 2
        while i >= 0 and src[i].strip().startswith("#"):
            above.insert(0, src[i].strip().lstrip("#").strip())
            i -= 1
        comments[node.target.id] = " ".join([*above, trailing]).strip()
    return comments


def _fields_table(cls: type, prefix: str = "") -> list[str]:
    notes = _field_comments(cls)
    rows = ["| name | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        default: Any = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            default = "(table below)"
        text = notes.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | `{default!r}` | {text} |")
    return rows


def render_config() -> str:
    from flnode.node.config import ENV_PREFIX, NodeConfig
    from flnode.protocol.genesis import RewardRules, Rules

    lines = ["# Configuration reference", "", "Generated from the code by `python -m flnode.cli.reference docs/reference`.",
             "", "## Node settings (`HOME/config.toml`)", "",
             f"Precedence: flag > environment (`{ENV_PREFIX}<NAME>`, upper case) > `config.toml` > default. "
             "`flnode config show --home DIR` prints each effective value and its source.", "",
             *_fields_table(NodeConfig), "", "## Genesis rules (`genesis.json`, `rules`)", "",
             "Fixed for the life of a chain; every node checks them at start.", "", *_fields_table(Rules), "",
             "## Rewards (`rules.rewards`)", "", *_fields_table(RewardRules, "rewards."), ""]
    return "\n".join(lines)


PAGES = {"cli.md": render_cli, "config.md": render_config}


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/reference")
    out.mkdir(parents=True, exist_ok=True)
    for name, render in PAGES.items():
        (out / name).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
