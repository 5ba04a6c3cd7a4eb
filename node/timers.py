"""Consensus timeouts on trio's clock: one pending timer per kind, and only live ones reach the machine.

A timeout the machine schedules is for its current (height, round); one of an earlier (height, round) would be
dropped by the machine on arrival, so a newer timer of a kind replaces the older, and `retain` cancels every
timer the machine has moved past.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from flnode.consensus import ScheduleTimeout, TimeoutFired, TimeoutKind


class Timers:
    def __init__(self, send: Callable[[TimeoutFired], Awaitable[None]]) -> None:
        self.send = send
        self._pending: dict[TimeoutKind, tuple[int, int, trio.CancelScope]] = {}
        self._nursery: trio.Nursery | None = None
        self.fired = 0
        self.cancelled = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def schedule(self, a: ScheduleTimeout) -> None:
        if self._nursery is None:
            raise RuntimeError("Timers.schedule before Timers.run started")
        self._cancel(a.kind)
        scope = trio.CancelScope()
        self._pending[a.kind] = (a.height, a.round, scope)
        self._nursery.start_soon(self._fire, a, scope)

    def retain(self, height: int, round_: int) -> None:
        """Cancel the timers of any other (height, round) than the machine's current one."""
        for kind, (h, r, _) in list(self._pending.items()):
            if (h, r) != (height, round_):
                self._cancel(kind)

    def pending(self) -> dict[TimeoutKind, tuple[int, int]]:
        return {k: (h, r) for k, (h, r, _) in self._pending.items()}

    def _cancel(self, kind: TimeoutKind) -> None:
        entry = self._pending.pop(kind, None)
        if entry is not None:
            entry[2].cancel()
            self.cancelled += 1

    async def _fire(self, a: ScheduleTimeout, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(a.duration_ms / 1000)
            if self._pending.get(a.kind, (0, 0, None))[2] is scope:
                del self._pending[a.kind]
            self.fired += 1
            await self.send(TimeoutFired(a.kind, a.height, a.round))
