"""Counters and gauges, served as Prometheus text on an optional HTTP endpoint (off by default)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import trio

log = logging.getLogger("flnode.metrics")


class Metrics:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}

    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] += by

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def render(self) -> str:
        lines = []
        for name in sorted(self.counters):
            lines += [f"# TYPE flnode_{name} counter", f"flnode_{name} {self.counters[name]}"]
        for name in sorted(self.gauges):
            lines += [f"# TYPE flnode_{name} gauge", f"flnode_{name} {self.gauges[name]}"]
        return "\n".join(lines) + "\n"


async def serve_metrics(metrics: Metrics, listen: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    host, _, port = listen.rpartition(":")

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                await stream.receive_some(4096)
                body = metrics.render().encode()
                head = (
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode()
                await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(int(port), host=host or None)
    log.info("metrics endpoint listening", extra={"listen": listen})
    task_status.started()
    await trio.serve_listeners(handle, listeners)
