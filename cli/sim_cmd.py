"""`flnode sim`: run the consensus machine in the deterministic simulator over many seeds."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Annotated

import typer

from .errors import fail, user_errors


def register(app: typer.Typer) -> None:
    app.command("sim")(sim)


@user_errors
def sim(
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=200, help="Validators (equal power).")] = 4,
    byzantine: Annotated[int, typer.Option("--byzantine", min=0, help="How many of them are Byzantine.")] = 0,
    heights: Annotated[int, typer.Option("--heights", min=1, help="Heights every honest node must commit.")] = 20,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Runs, one per seed.")] = 50,
    first_seed: Annotated[int, typer.Option("--first-seed", help="Seed of the first run.")] = 0,
    faults: Annotated[str, typer.Option("--faults", help="Comma-separated: drop,delay,dup,partition,crash.")] = "",
    modes: Annotated[
        str, typer.Option("--modes", help="Byzantine behaviours: split,equivocate,double_vote,silent,bad_signature,"
                          "unknown_block,body_swap (relays proposals with another body under the same header),flood "
                          "(signed junk for rounds far ahead and later heights) (default: all, in turn; with "
                          "--allow-unsafe: split, colluding equivocators).")
    ] = "",
    validation: Annotated[
        str, typer.Option("--validation", help="How applications answer ValidateValue: invalid (Byzantine proposers "
                          "build blocks the honest nodes judge invalid), and per honest node in turn: immediate, slow "
                          "(late, maybe after the propose timeout), unavailable (no answer until the block's data "
                          "arrives). Comma-separated; default: immediate.")
    ] = "",
    twins: Annotated[bool, typer.Option("--twins", help="Add a twin: a second honest copy of validator 0's key.")] = False,
    set_changes: Annotated[int, typer.Option("--set-changes", min=0, help="Change the validator set every K heights "
                                             "(open membership; Byzantine < 1/3 of each set).")] = 0,
    allow_unsafe: Annotated[
        bool, typer.Option("--allow-unsafe", help="Allow byzantine >= n/3 (the checker should then find violations).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary.")] = False,
) -> None:
    """Check safety, liveness and certificates of Tendermint under faults and Byzantine validators.

    Exits 1 on any violation (with --allow-unsafe, finding one is the expected outcome and still exits 1)."""
    from flnode.consensus.sim import BYZANTINE_MODES, FAULTS, VALIDATION_MODES, SimConfig, run_many

    fault_set = tuple(f for f in (x.strip() for x in faults.split(",")) if f)
    unknown = [f for f in fault_set if f not in FAULTS]
    if unknown:
        fail(f"unknown fault(s) {unknown}; choose from {','.join(FAULTS)}")
    unsafe = 3 * byzantine >= nodes
    # At or above n/3 the Byzantine validators collude: each shows one block to one half of the honest nodes and
    # another to the other half, as proposer and as voter (that is what it takes to fork Tendermint).
    mode_set = tuple(m for m in (x.strip() for x in modes.split(",")) if m) or (
        ("split",) if unsafe else BYZANTINE_MODES)
    bad_modes = [m for m in mode_set if m not in BYZANTINE_MODES]
    if bad_modes:
        fail(f"unknown Byzantine mode(s) {bad_modes}; choose from {','.join(BYZANTINE_MODES)}")
    validation_set = tuple(v for v in (x.strip() for x in validation.split(",")) if v)
    bad_validation = [v for v in validation_set if v not in VALIDATION_MODES]
    if bad_validation:
        fail(f"unknown validation mode(s) {bad_validation}; choose from {','.join(VALIDATION_MODES)}")
    if byzantine >= nodes:
        fail("at least one validator must be honest")
    if unsafe and not allow_unsafe:
        fail(f"{byzantine} Byzantine of {nodes} is at or above n/3: BFT promises nothing there; add --allow-unsafe")
    cfg = SimConfig(nodes=nodes, byzantine=byzantine, heights=heights, faults=fault_set, byzantine_modes=mode_set,
                    twins=twins, validation=validation_set, set_changes=set_changes)
    t0 = time.process_time()
    summary = run_many(replace(cfg), range(first_seed, first_seed + seeds))
    cpu = time.process_time() - t0
    out = {
        "runs": summary.runs,
        "nodes": nodes,
        "byzantine": byzantine,
        "faults": list(fault_set),
        "byzantine_modes": list(mode_set) if byzantine else [],
        "validation": list(validation_set),
        "heights_committed": summary.heights_committed,
        "node_heights": summary.node_heights,
        "max_round": summary.max_round,
        "rounds_used": summary.rounds,
        "rounds_per_height": round(summary.rounds / summary.decided_heights, 3) if summary.decided_heights else None,
        "crashes": summary.crashes,
        "torn_records": summary.torn_records,
        "messages_sent": summary.messages,
        "safety_violations": summary.safety_violations,
        "liveness_failures": summary.liveness_failures,
        "certificate_failures": summary.certificate_failures,
        "memory_failures": summary.memory_failures,
        "decode_rejections": summary.decode_rejections,
        "invalid_answers": summary.invalid_answers,
        "late_answers": summary.late_answers,
        "flood_messages": summary.flood_messages,
        "max_future_events": summary.max_future,
        "max_rounds_stored": summary.max_rounds_stored,
        "max_round_ahead": summary.max_round_ahead,
        "max_votes_per_round": summary.max_votes_per_round,
        "failing_seeds": summary.failing_seeds[:20],
        "first_problem": summary.first_problem,
        "cpu_s": round(cpu, 3),
        "node_heights_per_cpu_s": round(summary.node_heights / cpu) if cpu > 0 else None,
    }
    if as_json:
        typer.echo(json.dumps(out))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"flnode sim: {nodes} validators, {byzantine} Byzantine, faults: {','.join(fault_set) or 'none'}")
        t.add_column("measure")
        t.add_column("value", justify="right")
        for k, v in out.items():
            t.add_row(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
        Console().print(t)
    if not summary.ok:
        raise typer.Exit(1)
