"""The simulated network: safety and liveness over many seeds and faults, Twins, a checker that can fail, and a
Hypothesis state machine that drives the network step by step (deliver, drop, duplicate, partition, heal, fire
timeouts, crash, restart)."""

from __future__ import annotations

import heapq
from dataclasses import replace

import pytest
from flnode.cli.main import app
from flnode.consensus import StartHeight, Tendermint, TimeoutFired
from flnode.consensus.sim import FAULTS, SimConfig, Simulation, fake_sign, run_many, run_simulation
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from typer.testing import CliRunner


@pytest.mark.parametrize(
    "nodes, byzantine, seeds",
    [(4, 0, 200), (4, 1, 120), (7, 2, 60), (10, 3, 20)],
)
def test_safe_and_live_under_every_fault(nodes: int, byzantine: int, seeds: int) -> None:
    cfg = SimConfig(nodes=nodes, byzantine=byzantine, heights=6, faults=FAULTS)
    s = run_many(cfg, range(seeds))
    assert s.ok, s.first_problem
    assert s.node_heights == seeds * 6 * (nodes - byzantine)


def test_twins_do_not_break_safety() -> None:
    s = run_many(SimConfig(nodes=4, heights=6, faults=("drop", "delay"), twins=True), range(30))
    assert s.safety_violations == 0 and s.certificate_failures == 0, s.first_problem


def test_checker_finds_a_fork_when_byzantine_power_reaches_a_third() -> None:
    s = run_many(SimConfig(nodes=4, byzantine=2, heights=5, byzantine_modes=("split",)), range(10))
    assert s.safety_violations > 0


def test_runs_are_deterministic_per_seed() -> None:
    cfg = SimConfig(nodes=4, byzantine=1, heights=5, faults=FAULTS, seed=7)
    a, b = run_simulation(cfg), run_simulation(replace(cfg))
    assert (a.messages, a.events, a.virtual_ms, a.max_round) == (b.messages, b.events, b.virtual_ms, b.max_round)


def test_rounds_are_used_when_faults_hit() -> None:
    s = run_many(SimConfig(nodes=4, heights=5, faults=("drop", "partition", "crash")), range(20))
    assert s.ok and s.max_round >= 1  # some height needed more than one round


def test_cli_sim_summary_and_exit_codes() -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["sim", "--nodes", "4", "--heights", "3", "--seeds", "3", "--faults", "drop", "--json"])
    assert ok.exit_code == 0, ok.output
    assert '"safety_violations": 0' in ok.output
    refused = runner.invoke(app, ["sim", "--nodes", "4", "--byzantine", "2"])
    assert refused.exit_code == 2 and "allow-unsafe" in refused.output
    unsafe = runner.invoke(
        app, ["sim", "--nodes", "4", "--byzantine", "2", "--modes", "split", "--seeds", "5", "--heights", "3",
              "--allow-unsafe", "--json"],
    )
    assert unsafe.exit_code == 1 and '"safety_violations": 0' not in unsafe.output


class NetworkMachine(RuleBasedStateMachine):
    """Hypothesis chooses the schedule; safety must hold after every step."""

    @initialize(n=st.sampled_from([4, 7, 10]), byz_mode=st.sampled_from(["split", "double_vote", "silent"]),
                twins=st.booleans())
    def setup(self, n: int, byz_mode: str, twins: bool) -> None:
        f = (n - 1) // 3
        byz = max(0, f - 1) if twins else f  # a twin pair counts as one Byzantine validator
        self.sim = Simulation(SimConfig(nodes=n, byzantine=byz, heights=50, byzantine_modes=(byz_mode,), twins=twins))
        self.sim.queue = [q for q in self.sim.queue if q[2] >= 0]  # Hypothesis drives the faults itself
        heapq.heapify(self.sim.queue)
        for node in self.sim.nodes:
            assert node.machine is not None
            self.sim._perform(node.idx, node.machine.step(StartHeight(1)))

    def _pop(self, want_message: bool) -> tuple[int, int, int, object] | None:
        """Take the first queued network message, or the first queued timeout (never a shell answer)."""
        q = self.sim.queue
        for i, item in enumerate(q):
            is_msg = isinstance(item[3], tuple)
            kind_ok = is_msg if want_message else isinstance(item[3], TimeoutFired)
            if kind_ok and item[2] >= 0:
                q.pop(i)
                heapq.heapify(q)
                return item
        return None

    @rule(k=st.integers(1, 30))
    def deliver(self, k: int) -> None:
        for _ in range(k):
            if not self.sim.queue:
                return
            at, _, idx, item = heapq.heappop(self.sim.queue)
            self.sim.now = max(self.sim.now, at)
            if idx >= 0:
                self.sim._deliver(idx, item)

    @rule()
    def drop(self) -> None:
        self._pop(True)

    @rule()
    def duplicate(self) -> None:
        item = self._pop(True)
        if item is not None:
            at, seq, idx, ev = item
            for _ in range(2):
                self.sim._push(at, idx, ev)

    @rule()
    def fire_timeout(self) -> None:
        item = self._pop(False)
        if item is not None:
            self.sim.now = max(self.sim.now, item[0])
            self.sim._deliver(item[2], item[3])

    @rule(data=st.data())
    def partition(self, data: st.DataObject) -> None:
        total = len(self.sim.nodes)
        side = data.draw(st.sets(st.integers(0, total - 1), min_size=1, max_size=total - 1))
        self.sim.partition = [set(side), set(range(total)) - set(side)]

    @rule()
    def heal(self) -> None:
        self.sim.partition = None

    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.sim.nodes) - 1))
        self.sim._control(("crash", i))

    @precondition(lambda self: any(not n.up for n in self.sim.nodes))
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        down = [n.idx for n in self.sim.nodes if not n.up]
        self.sim._control(("restart", data.draw(st.sampled_from(down))))

    @invariant()
    def no_fork_and_certificates_verify(self) -> None:
        decided: dict[int, bytes] = {}
        for node in self.sim.nodes:
            if not node.honest:
                continue
            for h, bh in node.commits.items():
                assert decided.setdefault(h, bh) == bh, f"fork at height {h}"
            for block, cert in node.blocks.values():
                assert self.sim._cert_ok(block, cert)

    def teardown(self) -> None:
        """After the storm: heal, restart everyone, and the network must make progress again (liveness after GST)."""
        if not hasattr(self, "sim"):
            return
        s = self.sim
        s.partition = None
        for node in s.nodes:
            if not node.up:
                s._control(("restart", node.idx))
        honest = [n for n in s.nodes if n.honest]
        start = min(len(n.commits) for n in honest)
        events = 0
        while s.queue and events < 200_000 and min(len(n.commits) for n in honest) < start + 2:
            at, _, idx, item = heapq.heappop(s.queue)
            s.now = max(s.now, at)
            if idx >= 0:
                s._deliver(idx, item)
            events += 1
        states = [(n.idx, len(n.commits), n.machine.height if n.machine else None, n.machine.round if n.machine else None,
                   n.up) for n in s.nodes]
        assert min(len(n.commits) for n in honest) >= start + 2, f"no progress after the network healed: {states} " \
            f"events={events} queue={len(s.queue)}"


NetworkMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
)
TestNetworkMachine = NetworkMachine.TestCase


def test_restored_machine_is_usable_with_real_records() -> None:
    sim = Simulation(SimConfig(nodes=4, heights=3))
    sim.run()
    node = sim.nodes[1]
    m = Tendermint.restore(sim.validators, node.key, lambda k, p: fake_sign(node.key, k, p), sim.cfg.timeouts,
                           node.records)
    assert m.step(StartHeight(4))  # starts a fresh height
