"""The `flnode` command line (typer). Each command group lives in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="flnode",
    help="Federated learning with no central server: gossip, BFT consensus, deterministic aggregation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print the flnode version."""
    from flnode import __version__

    typer.echo(__version__)


def _register() -> None:
    from . import chain_cmd, config_cmd, demo, members_cmd, model_cmd, node_cmd, sim_cmd

    for module in (node_cmd, demo, chain_cmd, sim_cmd, config_cmd, members_cmd, model_cmd):
        module.register(app)


_register()

if __name__ == "__main__":
    app()
