"""The HTTP server: hypercorn's trio worker inside the node's own nursery, with tight limits.

It runs on the node's event loop, so every handler must stay short: chain reads go to worker threads
(ChainReader.run), rendering is small, and hypercorn bounds what a client can make us hold (header bytes, idle and
read timeouts, queued body chunks).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ..metrics import Metrics
from ..status import NodeView, live_snapshot
from .app import WebApp, metrics_only_app

log = logging.getLogger("flnode.web")

MAX_HEADER_BYTES = 8 * 1024  # request line + headers; beyond this h11 answers 400 and closes
READ_TIMEOUT_S = 10  # a client that sends nothing for this long is dropped (slowloris)
KEEP_ALIVE_S = 5


def hypercorn_config(listen: str) -> Config:
    config = Config()
    config.bind = [listen]
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.h2_max_header_list_size = MAX_HEADER_BYTES
    config.h2_max_concurrent_streams = 16
    config.read_timeout = READ_TIMEOUT_S
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.max_app_queue_size = 4  # body chunks buffered per request; we read none
    config.graceful_timeout = 1.0
    config.backlog = 128
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("flnode.web.hypercorn")
    config.alpn_protocols = ["http/1.1"]  # no TLS here: a reverse proxy terminates it (see README)
    return config


class ListenError(OSError):
    """The HTTP address cannot be bound (port in use, no such address): one line, no traceback."""


async def serve_asgi(app: Any, listen: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``listen`` (host:port) until cancelled; ``task_status.started`` gets the bound URLs."""
    config = hypercorn_config(listen)
    try:  # bound here, not inside hypercorn's nursery, so a port in use is one clear error
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
    except OSError as exc:
        raise ListenError(exc.errno, f"cannot listen on {listen} for HTTP: {exc.strerror} (port in use?)") from None
    await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config, sockets=sockets,
                       task_status=task_status)


async def serve_web(node: NodeView, listen: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """The explorer, JSON API and /metrics of a running node, on ``listen``."""
    app = WebApp(Path(node.store.path), node.genesis, live=lambda: live_snapshot(node), metrics=node.metrics)
    try:
        log.info("web explorer listening", extra={"url": f"http://{listen}/"})
        await serve_asgi(app, listen, task_status=task_status)
    finally:
        app.reader.close()


async def serve_metrics(metrics: Metrics, listen: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve only ``/metrics`` on ``listen`` (the ``metrics_listen`` setting)."""
    await serve_asgi(metrics_only_app(metrics), listen, task_status=task_status)


async def serve_configured(nursery: trio.Nursery, node: NodeView, metrics_listen: str, http_listen: str) -> None:
    """What the node's config asks to serve: /metrics alone, and the explorer with its JSON API and /metrics."""
    if metrics_listen:
        await nursery.start(serve_metrics, node.metrics, metrics_listen)
    if http_listen:
        await nursery.start(serve_web, node, http_listen)
