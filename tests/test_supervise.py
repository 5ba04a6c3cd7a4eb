"""Background tasks are supervised: an unexpected exception is logged, counted and the task restarted with
back-off; it never stops the node. (Only the consensus driver and the store are fatal.)"""

from __future__ import annotations

from pathlib import Path

import trio
from flnode.node.daemon import Daemon
from flnode.node.metrics import Metrics
from flnode.node.supervise import supervised
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from test_node_admission import net as net  # noqa: F401 - the shared testnet fixture
from test_node_commit import _daemon


async def test_supervised_restarts_with_backoff_until_the_task_returns() -> None:
    metrics = Metrics()
    calls: list[float] = []

    async def flaky() -> None:
        calls.append(trio.current_time())
        if len(calls) < 4:
            raise RuntimeError("boom")

    with trio.fail_after(5):
        await supervised("flaky", flaky, metrics=metrics)
    assert len(calls) == 4 and metrics.counters["task_failures_flaky"] == 3
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4  # back-off doubles


async def test_a_crashing_participant_loop_does_not_stop_the_node(
    net: tuple[Path, Genesis, list[NodeKey]], tmp_path: Path, monkeypatch: object  # noqa: F811
) -> None:
    d, genesis, _ = net
    daemon: Daemon = _daemon(d, genesis, tmp_path)
    trainer = daemon.use_trainer(object(), 0)  # type: ignore[arg-type]  # a participant whose training code is broken

    def broken(*args: object) -> None:
        raise ValueError("a bug in training")

    import flnode.node.trainer as mod

    monkeypatch.setattr(mod, "make_update", broken)  # type: ignore[attr-defined]
    async with trio.open_nursery() as n:
        daemon.tasks.nursery = n
        daemon.links_up.set()  # as if the start-up gate had opened
        daemon.tasks.supervise("participant", trainer.run)
        with trio.fail_after(10):
            while daemon.metrics.counters["task_failures_participant"] < 3:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()  # we got here: the failures did not tear the nursery down
    daemon.store.close()
