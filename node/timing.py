"""Phase marks of the height in progress (seconds since it started here), stored with its metrics."""

from __future__ import annotations

from collections.abc import Callable


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

    def since_start(self) -> float:
        return self.clock() - self.started_at
