"""The simulator's application answers and Byzantine relayers: invalid blocks of Byzantine proposers, slow and
unavailable applications, a relayer that swaps a proposal's body under its signed header (the decoder rejects it),
and a validator flooding signed junk for rounds far ahead and later heights (the honest machines' memory stays within
the machine's bounds). Over many seeds at n = 4 and 7 with f < n/3: no fork, every honest node decides every height
after GST. And the checker is not vacuous: it finds the fork at n/3, the swapped body when the decoder does not
check it, an invalid block an application wrongly accepts, and a buffer that outgrows its bound."""

from __future__ import annotations

import json

import pytest
from conftest import examples
from flnode.cli.main import app
from flnode.consensus import machine
from flnode.consensus.machine import FUTURE_BUFFER, MAX_ROUND_AHEAD
from flnode.consensus.sim import (
    FAULTS,
    VALIDATION_MODES,
    SimConfig,
    Simulation,
    Summary,
    run_many,
    run_simulation,
)
from flnode.consensus.sim.network import BAD_APP_HASH, SWAP_UPDATE, body_matches, make_block
from flnode.protocol.messages import Block
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

SIZES = [(4, 1, 30), (7, 2, 10)]  # (nodes, Byzantine, seeds)


def _live(s: Summary, cfg: SimConfig, seeds: int) -> None:
    assert s.ok, s.first_problem
    assert s.node_heights == seeds * cfg.heights * (cfg.nodes - cfg.byzantine)  # every honest node, every height


def _bounded(s: Summary, nodes: int) -> None:
    assert s.memory_failures == 0
    assert s.max_future <= FUTURE_BUFFER
    assert s.max_round_ahead <= MAX_ROUND_AHEAD
    assert s.max_votes_per_round <= 2 * 2 * nodes  # two types, at most two values per validator
    assert s.max_rounds_stored <= MAX_ROUND_AHEAD + s.max_round + 2


# ---------------------------------------------------------------- the decoder and the sim's blocks


def test_sim_blocks_decode_and_a_swapped_body_does_not() -> None:
    b = make_block(3, b"\x01" * 32, 7)
    assert body_matches(b) and Block.decode(b.encode()) == b
    swapped = Block(b.header, (SWAP_UPDATE,))
    assert swapped.hash() == b.hash()  # same header: the proposer's signature still verifies
    assert not body_matches(swapped)
    with pytest.raises(Exception):  # noqa: B017 - the decoder's own error type
        Block.decode(swapped.encode())
    assert make_block(3, b"\x01" * 32, 7, bad=True).header.app_hash == BAD_APP_HASH


def test_unknown_validation_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        Simulation(SimConfig(validation=("sometimes",)))


# ---------------------------------------------------------------- Byzantine relayer and flooder, f < n/3


@pytest.mark.parametrize("nodes, byzantine, seeds", SIZES)
def test_body_swap_is_rejected_by_the_decoder_and_changes_nothing(nodes: int, byzantine: int, seeds: int) -> None:
    cfg = SimConfig(nodes=nodes, byzantine=byzantine, heights=4, faults=FAULTS, byzantine_modes=("body_swap",))
    s = run_many(cfg, range(100, 100 + seeds))
    _live(s, cfg, seeds)
    assert s.decode_rejections > seeds  # the swapped proposals really reached honest decoders


@pytest.mark.parametrize("nodes, byzantine, seeds", SIZES)
def test_flood_keeps_honest_memory_bounded(nodes: int, byzantine: int, seeds: int) -> None:
    cfg = SimConfig(nodes=nodes, byzantine=byzantine, heights=4, faults=FAULTS, byzantine_modes=("flood",))
    s = run_many(cfg, range(200, 200 + seeds))
    _live(s, cfg, seeds)
    _bounded(s, nodes)
    assert s.flood_messages > 0 and s.max_round_ahead > 0 and s.max_future > 0  # the junk was stored up to the bounds


def test_a_flood_of_future_heights_gets_only_its_share_of_the_buffer_and_the_network_stays_live() -> None:
    cfg = SimConfig(nodes=4, byzantine=1, heights=3, faults=("drop", "delay"), byzantine_modes=("flood",),
                    flood_burst=2000)
    s = run_many(cfg, [7])
    _live(s, cfg, 1)
    _bounded(s, 4)
    # the flooder holds at most its share (FUTURE_BUFFER // (n + 2)) plus the honest validators' few messages: the
    # buffer never fills, so honest messages for the next height are never dropped
    assert 0 < s.max_future < FUTURE_BUFFER // 4


def test_flood_together_with_body_swap_and_the_other_modes_at_n7() -> None:
    cfg = SimConfig(nodes=7, byzantine=2, heights=4, faults=FAULTS, byzantine_modes=("flood", "body_swap"),
                    validation=("invalid", "slow", "immediate", "unavailable"))
    s = run_many(cfg, range(300, 308))
    _live(s, cfg, 8)
    _bounded(s, 7)
    assert s.decode_rejections > 0 and s.flood_messages > 0 and s.invalid_answers > 0 and s.late_answers > 0


# ---------------------------------------------------------------- validation answers, f < n/3


@pytest.mark.parametrize("nodes, byzantine, seeds", SIZES)
@pytest.mark.parametrize("mode", [m for m in VALIDATION_MODES if m != "immediate"])
def test_each_validation_mode_is_safe_and_live(mode: str, nodes: int, byzantine: int, seeds: int) -> None:
    cfg = SimConfig(nodes=nodes, byzantine=byzantine, heights=4, faults=FAULTS, validation=(mode,),
                    byzantine_modes=("equivocate", "double_vote", "split"))
    s = run_many(cfg, range(400, 400 + seeds))
    _live(s, cfg, seeds)
    if mode == "invalid":
        assert s.invalid_answers > 0  # Byzantine proposers' bad blocks were proposed and judged invalid
    else:
        assert s.late_answers > 0  # some answers came after the propose timeout


def test_invalid_blocks_never_decide_and_later_rounds_do() -> None:
    """A Byzantine proposer builds only bad blocks (and equivocates them): every honest node prevotes nil on them,
    so its rounds never decide; those heights are decided in later rounds led by honest proposers."""
    cfg = SimConfig(nodes=4, byzantine=1, heights=8, validation=("invalid",), byzantine_modes=("equivocate",))
    s = run_many(cfg, range(20))
    _live(s, cfg, 20)
    assert s.invalid_answers > 0 and s.max_round >= 1


# ---------------------------------------------------------------- the checker is not vacuous


def test_fork_is_found_at_n_over_3_under_the_new_modes() -> None:
    cfg = SimConfig(nodes=4, byzantine=2, heights=4, faults=("partition", "drop"), byzantine_modes=("split",),
                    validation=("slow", "unavailable", "immediate"))
    assert run_many(cfg, range(10)).safety_violations > 0
    cfg7 = SimConfig(nodes=7, byzantine=3, heights=4, faults=("partition", "drop"),
                     byzantine_modes=("split",), validation=("unavailable", "slow"))
    assert run_many(cfg7, range(10)).safety_violations > 0


def test_checker_finds_a_swapped_body_the_decoder_lets_through() -> None:
    """With the old decoder (no body check) a relayed swap is accepted under the proposer's signature, and honest
    nodes commit one header with two bodies: the checker reports it."""
    cfg = SimConfig(nodes=4, byzantine=1, heights=5, faults=("drop", "delay"), byzantine_modes=("body_swap",),
                    check_body=False)
    s = run_many(cfg, range(10))
    assert s.safety_violations > 0 and "two bodies" in s.first_problem
    assert s.decode_rejections == 0


def test_checker_finds_an_invalid_block_an_application_accepts() -> None:
    class Gullible(Simulation):
        def _judge(self, block: Block) -> bool:
            return True  # an application that never re-executes

    found = 0
    for seed in range(10):
        cfg = SimConfig(nodes=4, byzantine=1, heights=4, seed=seed, validation=("invalid",),
                        byzantine_modes=("equivocate",))
        r = Gullible(cfg).run()
        found += sum("judges invalid" in v for v in r.safety_violations)
    assert found > 0


def test_memory_watch_finds_a_machine_without_its_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "MAX_ROUND_AHEAD", 1 << 30)
    r = run_simulation(SimConfig(nodes=4, byzantine=1, heights=3, byzantine_modes=("flood",), seed=1))
    assert r.memory_failures and "rounds ahead" in r.memory_failures[0]
    assert not r.ok


def test_a_run_with_the_new_modes_replays_exactly_from_its_seed() -> None:
    cfg = SimConfig(nodes=7, byzantine=2, heights=3, faults=FAULTS, seed=5, byzantine_modes=("flood", "body_swap"),
                    validation=("invalid", "slow", "unavailable"))
    a, b = run_simulation(cfg), run_simulation(cfg)
    assert a == b


# ---------------------------------------------------------------- property: any mix, any seed


@settings(max_examples=examples(12), deadline=None)
@given(
    size=st.sampled_from([(4, 1), (7, 2)]),
    modes=st.lists(st.sampled_from(["body_swap", "flood", "equivocate", "split", "double_vote"]), min_size=1,
                   max_size=2),
    validation=st.lists(st.sampled_from(list(VALIDATION_MODES)), max_size=3),
    faults=st.lists(st.sampled_from(list(FAULTS)), unique=True),
    seed=st.integers(0, 1 << 30),
)
def test_any_mix_of_new_modes_is_safe_and_live(
    size: tuple[int, int], modes: list[str], validation: list[str], faults: list[str], seed: int
) -> None:
    nodes, byzantine = size
    r = run_simulation(SimConfig(nodes=nodes, byzantine=byzantine, heights=3, seed=seed, faults=tuple(faults),
                                 byzantine_modes=tuple(modes), validation=tuple(validation)))
    assert r.ok, (r.safety_violations + r.liveness_failures + r.certificate_failures + r.memory_failures)[:3]
    assert r.heights_committed == 3


# ---------------------------------------------------------------- flnode sim


def test_cli_runs_the_new_modes() -> None:
    res = CliRunner().invoke(app, ["sim", "--nodes", "4", "--byzantine", "1", "--heights", "3", "--seeds", "4",
                                   "--modes", "body_swap,flood", "--validation", "invalid,slow,unavailable",
                                   "--faults", "drop,delay", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["safety_violations"] == 0 and out["liveness_failures"] == 0 and out["memory_failures"] == 0
    assert out["decode_rejections"] > 0 and out["invalid_answers"] > 0
    assert out["byzantine_modes"] == ["body_swap", "flood"] and out["validation"] == ["invalid", "slow", "unavailable"]


def test_cli_refuses_an_unknown_validation_mode() -> None:
    res = CliRunner().invoke(app, ["sim", "--seeds", "1", "--validation", "sometimes"])
    assert res.exit_code != 0 and "validation" in res.output
