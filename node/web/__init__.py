"""A read-only web explorer, JSON API and /metrics served by each node (hypercorn on the node's trio loop)."""

from .app import WebApp, metrics_only_app
from .reader import ChainReader
from .server import serve_asgi, serve_configured, serve_metrics, serve_web

__all__ = ["ChainReader", "WebApp", "metrics_only_app", "serve_asgi", "serve_configured", "serve_metrics", "serve_web"]
