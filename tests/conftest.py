"""Test-wide Hypothesis settings.

CI=true: a fixed, derandomized set of examples, so a run is reproducible. `make fuzz` (profile "fuzz"): random
seeds and FLNODE_FUZZ_FACTOR times the examples; a test that sets max_examples itself must use `examples(n)` for
the factor to reach it (a profile cannot override an explicit @settings value). FLNODE_HYPOTHESIS_ONLY=1 deselects
every test that is not a Hypothesis test.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import is_hypothesis_test, settings

FUZZ_FACTOR = max(1, int(os.environ.get("FLNODE_FUZZ_FACTOR", "1")))


def examples(n: int) -> int:
    """max_examples for a test that sets its own: n, times FLNODE_FUZZ_FACTOR."""
    return n * FUZZ_FACTOR


settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("fuzz", derandomize=False, deadline=None, max_examples=examples(100))
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FLNODE_HYPOTHESIS_ONLY") != "1":
        return
    keep = [i for i in items if is_hypothesis_test(getattr(i, "obj", None))]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
