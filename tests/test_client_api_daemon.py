"""A client that raises inside the running daemon: the participant loop counts it, records the traceback's last
line for the height and goes on (the task is not restarted: nothing crashed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import trio
from flnode.node.app.participant import Participant, trainer_record
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from test_node_admission import net as net  # noqa: F401 - the shared testnet fixture
from test_node_commit import _daemon


class Raising:
    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return []

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        raise KeyError("no such key")  # a bug in the user's training code

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        return 0.0, 0, {}


async def test_a_raising_client_costs_the_round_not_the_daemon(
    net: tuple[Path, Genesis, list[NodeKey]], tmp_path: Path  # noqa: F811
) -> None:
    d, genesis, _ = net
    daemon = _daemon(d, genesis, tmp_path)
    index = genesis.index_of(daemon.me)
    trainer = daemon.use_trainer(Participant(genesis, Raising(), index), index)
    async with trio.open_nursery() as n:
        daemon.tasks.nursery = n  # the daemon's supervision is what is tested
        daemon.links_up.set()
        daemon.tasks.supervise("participant", trainer.run)
        with trio.fail_after(10):
            while daemon.metrics.counters["trainer_errors_exception"] < 1:
                await trio.sleep(0.02)
        await trio.sleep(0.2)
        assert daemon.metrics.counters["task_failures_participant"] == 0  # handled, not a crash
        assert daemon.metrics.counters["trainer_errors_exception"] == 1  # once per round, not retried in a loop
        n.cancel_scope.cancel()
    daemon.store.close()
    assert trainer_record(daemon.data, 1) == {"trainer_error": "KeyError: 'no such key'", "trainer_error_kind": "exception"}
