"""Helpers shared by the tests that run real node processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flnode.cli.demo import NodeView, read_node
from flnode.node.chain.store import ChainStore


def heights(views: list[NodeView]) -> list[int]:
    """Each node's committed height, read from its store (read-only, while it runs)."""
    for v in views:
        read_node(v)
    return [v.height for v in views]


def model_hash_at(home: Path, height: int) -> str:
    store = ChainStore.open(home / "data" / "chain.sqlite", readonly=True)
    try:
        return store.get_state(height).model_hash.hex()
    finally:
        store.close()


def model_hashes_at(views: list[NodeView], height: int) -> set[str]:
    return {model_hash_at(v.home, height) for v in views}


def read_store(home: Path, fn: Any) -> Any:
    """fn(store) on a read-only connection to a node's chain store (safe while the node runs)."""
    store = ChainStore.open(home / "data" / "chain.sqlite", readonly=True)
    try:
        return fn(store)
    finally:
        store.close()


def log_tail(home: Path, n: int = 3000) -> str:
    try:
        return (home / "node.log").read_text()[-n:]
    except OSError:
        return "(no log)"


def run_until_signal(daemon: Any) -> None:
    """Run a daemon (the test-only node scripts) until SIGINT or SIGTERM, as `flnode start` does."""
    import signal

    import trio

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.run)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
