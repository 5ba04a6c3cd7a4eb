"""Supervision of background tasks: a failure is logged, counted and restarted with back-off.

Only the consensus driver and the store are fatal to the node; everything else (block building, validation,
the participant loop, metrics, status, sync) must not take the node down with an unexpected exception.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .metrics import Metrics

log = logging.getLogger("flnode.supervise")


async def supervised(
    name: str,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
    metrics: Metrics,
    restart: bool = True,
    max_backoff_s: float = 30.0,
) -> None:
    """Run `fn(*args)`; on an exception log it, count it, and (if `restart`) run it again after a back-off."""
    backoff = 0.1
    while True:
        try:
            await fn(*args)
            return
        except Exception:
            metrics.inc(f"task_failures_{name}")
            log.exception("background task failed", extra={"task": name, "restart_in_s": backoff if restart else None})
            if not restart:
                return
        await trio.sleep(backoff)
        backoff = min(max_backoff_s, backoff * 2)


class Tasks:
    """The node's nursery for background work: supervised services (restarted with back-off) and one-shot
    tasks (a failure is logged and counted, not fatal, not restarted)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.nursery: trio.Nursery | None = None  # set by the daemon's run (or a test driving services)

    def supervise(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any, restart: bool = True) -> None:
        assert self.nursery is not None, "tasks started before the node runs"
        self.nursery.start_soon(lambda: supervised(name, fn, *args, metrics=self.metrics, restart=restart))

    def spawn(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.supervise(name, fn, *args, restart=False)
