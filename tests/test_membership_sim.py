"""Open membership in the consensus simulator: validator sets that change every few heights (random members and
powers, proposer priorities carried across changes), under faults and Byzantine validators holding less than 1/3
of each set: no fork, every honest node (in the set or following) commits every height, and every certificate
verifies against the set of its own height, never a stale one."""

from __future__ import annotations

import pytest
from flnode.consensus import Tendermint
from flnode.consensus.sim import FAULTS, SimConfig
from flnode.consensus.sim.network import Simulation, run_many, run_simulation


@pytest.mark.parametrize(("nodes", "byzantine"), [(5, 1), (7, 2), (10, 3)])
def test_set_changes_under_faults_and_byzantine_validators(nodes: int, byzantine: int) -> None:
    cfg = SimConfig(nodes=nodes, byzantine=byzantine, heights=12, faults=FAULTS, set_changes=2)
    summary = run_many(cfg, range(25))
    assert summary.ok, summary


def test_sets_really_change_and_a_stale_set_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Simulation(SimConfig(nodes=7, byzantine=2, heights=12, seed=3, set_changes=2))
    sets = [sim.set_at(h).powers for h in range(1, 13)]
    assert sim.schedule[1][0] == 3 and len({tuple(sorted(p.items())) for p in sets}) > 2
    assert any(len(p) < 7 for p in sets)  # some nodes sat out a set (followers, and outsiders' votes ignored)
    assert run_simulation(SimConfig(nodes=7, byzantine=2, heights=12, seed=3, set_changes=2)).set_changes == 5
    # machines that keep the old set sign certificates the checker refuses (and it would fork with Byzantines)
    monkeypatch.setattr(Tendermint, "set_validators", lambda self, vs: None)
    r = run_simulation(SimConfig(nodes=7, heights=12, seed=3, set_changes=2))
    assert not r.ok and (r.certificate_failures or r.liveness_failures)
