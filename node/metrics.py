"""Counters and gauges, exposed in the Prometheus text format by prometheus_client.

The node keeps its own plain counters (cheap ``inc``/``set`` on the hot path, also written to status.json); a
custom collector turns them into Prometheus families only when someone scrapes. HTTP is served by the web server
(hypercorn, node/web): on ``http_listen`` beside the explorer, or alone on ``metrics_listen``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

PREFIX = "flnode_"


class Metrics:
    """prometheus_client is imported on the first scrape, not at start-up: it pulls in http, email and ssl, CPU
    that 16-32 node processes starting together on one machine pay before their first commit."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}
        self._registry: Any = None

    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] += by

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_collector(self))
        return self._registry

    def render(self) -> str:
        """The Prometheus text exposition (counters get the conventional ``_total`` suffix)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    @property
    def content_type(self) -> str:
        from prometheus_client import CONTENT_TYPE_LATEST

        return str(CONTENT_TYPE_LATEST)


def _collector(metrics: Metrics) -> Any:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

    class _Collector(Collector):
        def collect(self) -> Iterator[Metric]:
            # Copies: the collector may run while the event loop mutates the dicts.
            for name, value in sorted(dict(metrics.counters).items()):
                yield CounterMetricFamily(PREFIX + name, f"flnode counter {name}", value=value)
            for name, fvalue in sorted(dict(metrics.gauges).items()):
                yield GaugeMetricFamily(PREFIX + name, f"flnode gauge {name}", value=fvalue)

    return _Collector()
