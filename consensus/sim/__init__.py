"""Deterministic many-node simulator of the consensus machine, with faults and Byzantine validators."""

from .network import (
    BYZANTINE_MODES,
    FAULTS,
    VALIDATION_MODES,
    SimConfig,
    SimResult,
    Simulation,
    Summary,
    body_matches,
    fake_sign,
    fake_verify,
    make_block,
    run_many,
    run_simulation,
)

__all__ = [
    "BYZANTINE_MODES", "FAULTS", "VALIDATION_MODES", "SimConfig", "SimResult", "Simulation", "Summary", "fake_sign", "fake_verify",
    "body_matches", "make_block", "run_many", "run_simulation",
]
