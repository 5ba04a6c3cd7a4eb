"""Phase marks of the height in progress (seconds since it started here), stored with its metrics."""

from __future__ import annotations

from collections.abc import Callable

from flnode.consensus import TimeoutConfig
from flnode.protocol.genesis import Genesis


class HeightTiming:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.started_at = 0.0  # trio clock: when consensus on the next height started here
        self.by_commit = False  # it started at our own commit (not at start-up or restart)
        self.marks: dict[str, float] = {}

    def begin(self, now: float, by_commit: bool) -> None:
        self.started_at, self.by_commit, self.marks = now, by_commit, {}

    def mark(self, name: str, value: float | None = None) -> None:
        """The first mark of a name counts: `value` if given (a duration), else the time since the start."""
        if name not in self.marks:
            self.marks[name] = self.clock() - self.started_at if value is None else value

    def mark_once(self, name: str, *, when: Callable[[], bool]) -> None:
        """Mark `name` the first time `when()` holds (asked only until then: it may cost a scan)."""
        if name not in self.marks and when():
            self.mark(name)

    def since_start(self) -> float:
        return self.clock() - self.started_at


def consensus_timeouts(genesis: Genesis) -> TimeoutConfig:
    """The genesis schedule, and when a round is re-sent: consensus streams are reliable while connected (a
    reconnect re-sends), so only when a round is clearly stuck, after the propose timeout, and later the more
    validators there are: a re-send relays the polka's 2f+1 prevotes to every peer (n^2 messages per node); at 32
    validators on 2 cores a healthy round takes about as long as the propose timeout (measured: the runs with the
    most relayed duplicates were the slowest)."""
    r = genesis.rules
    every = max(r.timeout_propose_ms, r.timeout_prevote_ms) * max(1, len(genesis.validators) // 16)
    return TimeoutConfig.from_rules(r, rebroadcast_ms=every)
