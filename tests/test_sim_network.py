"""The simulator over many seeds: safety (no fork, no honest double-sign), liveness after GST and certificates under
every fault and every Byzantine behaviour with f < n/3; a checker that finds the fork at n/3; `flnode sim`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from flnode.cli.main import app
from flnode.consensus import StartHeight, Tendermint
from flnode.consensus.sim import (
    BYZANTINE_MODES,
    FAULTS,
    SimConfig,
    Simulation,
    fake_sign,
    run_many,
    run_simulation,
)
from typer.testing import CliRunner


@pytest.mark.parametrize(
    "nodes, byzantine, seeds", [(4, 0, 100), (4, 1, 150), (7, 2, 60), (10, 3, 20)],
)
def test_every_fault_and_byzantine_mode_is_safe_and_live(nodes: int, byzantine: int, seeds: int) -> None:
    s = run_many(SimConfig(nodes=nodes, byzantine=byzantine, heights=5, faults=FAULTS), range(1000, 1000 + seeds))
    assert s.ok, s.first_problem
    assert s.node_heights == seeds * 5 * (nodes - byzantine)
    assert s.crashes > 0 and s.torn_records > 0  # the faults really happened


@pytest.mark.parametrize("mode", BYZANTINE_MODES)
def test_each_byzantine_behaviour_alone(mode: str) -> None:
    s = run_many(SimConfig(nodes=4, byzantine=1, heights=4, faults=("drop", "delay", "partition"),
                           byzantine_modes=(mode,)), range(40))
    assert s.ok, s.first_problem


def test_twins_keep_safety_and_liveness() -> None:
    s = run_many(SimConfig(nodes=4, heights=5, faults=("drop", "delay", "dup"), twins=True), range(60))
    assert s.ok, s.first_problem
    s7 = run_many(SimConfig(nodes=7, byzantine=1, heights=4, faults=FAULTS, twins=True), range(20))
    assert s7.ok, s7.first_problem


def test_fork_is_found_when_byzantine_power_reaches_a_third() -> None:
    for n, f in [(4, 2), (7, 3), (10, 4)]:
        s = run_many(SimConfig(nodes=n, byzantine=f, heights=4, faults=("partition", "drop"),
                               byzantine_modes=("split",)), range(10))
        assert s.safety_violations > 0, (n, f)


def test_checker_catches_an_honest_double_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore that forgets the last record (the bug the torn-write model must not hide) is caught."""
    real = Tendermint.restore.__func__  # type: ignore[attr-defined]

    def forgetful(cls: type[Tendermint], validators, me, sign, timeouts, records):  # type: ignore[no-untyped-def]
        return real(cls, validators, me, sign, timeouts, records[:-1])

    monkeypatch.setattr(Tendermint, "restore", classmethod(forgetful))
    s = run_many(SimConfig(nodes=4, heights=5, faults=("crash", "drop", "partition")), range(60))
    assert s.safety_violations > 0 and "signed two values" in s.first_problem


def test_a_run_replays_exactly_from_its_seed() -> None:
    cfg = SimConfig(nodes=7, byzantine=2, heights=4, faults=FAULTS, seed=11)
    a, b = run_simulation(cfg), run_simulation(replace(cfg))
    assert a == b
    assert run_simulation(replace(cfg, seed=12)) != a


def test_faults_cost_rounds_and_liveness_is_bounded_after_gst() -> None:
    s = run_many(SimConfig(nodes=4, heights=5, faults=("drop", "partition", "crash")), range(30))
    assert s.ok and s.max_round >= 1 and s.rounds > s.decided_heights
    r = run_simulation(SimConfig(nodes=4, heights=5, faults=FAULTS, seed=3))
    assert r.ok and r.virtual_ms <= SimConfig().gst_ms + 5 * SimConfig().liveness_ms_per_height


def test_liveness_failure_is_reported() -> None:
    """A run cut short (here by its event budget) is a liveness failure, not a pass."""
    r = run_simulation(SimConfig(nodes=4, heights=5, faults=("partition",), max_events=50, seed=2))
    assert r.liveness_failures and not r.ok


def test_restored_machine_is_usable_with_real_records() -> None:
    sim = Simulation(SimConfig(nodes=4, heights=3))
    sim.run()
    node = sim.nodes[1]
    m = Tendermint.restore(sim.validators, node.key, lambda k, p: fake_sign(node.key, k, p), sim.cfg.timeouts,
                           node.records)
    assert m.step(StartHeight(4))  # starts a fresh height


def test_certificates_are_checked_by_power() -> None:
    sim = Simulation(SimConfig(nodes=4, heights=2))
    sim.run()
    block, cert = sim.nodes[0].blocks[1]
    assert sim._cert_ok(block, cert)
    assert not sim._cert_ok(block, replace(cert, signatures=cert.signatures[:2]))  # 2 of 4: not 2/3+
    assert not sim._cert_ok(block, replace(cert, signatures=cert.signatures[:1] * 3))  # not unique
    v, sig = cert.signatures[0]
    assert not sim._cert_ok(block, replace(cert, signatures=((v, b"\x01" * 64), *cert.signatures[1:])))


# ---------------------------------------------------------------- flnode sim

runner = CliRunner()


def test_cli_json_summary() -> None:
    res = runner.invoke(app, ["sim", "--nodes", "7", "--byzantine", "2", "--heights", "3", "--seeds", "3",
                              "--faults", "drop,delay,dup,partition,crash", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["runs"] == 3 and out["safety_violations"] == 0 and out["liveness_failures"] == 0
    assert out["node_heights"] == 3 * 3 * 5 and out["messages_sent"] > 0 and out["rounds_used"] >= 9


def test_cli_table_and_twins() -> None:
    res = runner.invoke(app, ["sim", "--nodes", "4", "--heights", "2", "--seeds", "2", "--twins"])
    assert res.exit_code == 0, res.output
    assert "safety_violations" in res.output and "liveness_failures" in res.output


def test_cli_unsafe_needs_the_flag_and_then_finds_a_fork() -> None:
    for n, f in [(4, 2), (7, 3)]:
        refused = runner.invoke(app, ["sim", "--nodes", str(n), "--byzantine", str(f)])
        assert refused.exit_code == 2 and "allow-unsafe" in refused.output
    res = runner.invoke(app, ["sim", "--nodes", "7", "--byzantine", "3", "--heights", "3", "--seeds", "5",
                              "--faults", "partition", "--allow-unsafe", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.output)["safety_violations"] > 0


def test_cli_rejects_unknown_faults() -> None:
    res = runner.invoke(app, ["sim", "--faults", "meteor"])
    assert res.exit_code != 0 and "meteor" in res.output
