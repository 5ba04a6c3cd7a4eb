"""The node-config override options that `flnode start` and `flnode config show` share (flag > env > file)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

BootstrapOpt = Annotated[list[str] | None, typer.Option("--bootstrap", help="Peer multiaddr (repeatable).")]
ListenOpt = Annotated[list[str] | None, typer.Option("--listen", help="Listen multiaddr (repeatable).")]
AnnounceOpt = Annotated[list[str] | None, typer.Option("--announce", help="Address to advertise (repeatable).")]
MetricsOpt = Annotated[str | None, typer.Option("--metrics-listen", help="host:port for Prometheus text.")]
HttpOpt = Annotated[str | None, typer.Option("--http-listen", help="host:port of the read-only web explorer.")]
LogLevelOpt = Annotated[str | None, typer.Option("--log-level")]
LogFormatOpt = Annotated[str | None, typer.Option("--log-format", help="text | json")]
DataPathOpt = Annotated[str | None, typer.Option("--data-path", help="Own .npz (x, y) to train on.")]


def config_flags(**values: Any) -> dict[str, Any]:
    """Flag values for load_config: lists become tuples, options not given are left out."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v}

AGGREGATOR_HELP = ("robust (nearest-neighbour mixing with f = (n - 1) // 3, then centered clipping around the last "
                   "step: the best worst case in bench_poisoning) | fedavg | median | trimmed_mean | multi_krum | "
                   "centered_clip | centered_clip_momentum")
