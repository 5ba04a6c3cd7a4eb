"""Privacy accounting from the chain: every participant's spent epsilon, and the budget rule. Pure.

The app state records one integer per participant: the rounds it was charged for (heights at which a block listed
an update of its, whatever the outcome, except an update refused for `privacy_budget_spent`). Epsilon is a function
of that count and the genesis alone, computed with dp-accounting's RDP accountant and rounded *up* to an integer
number of micro-epsilon; consensus only ever compares those integers. Every node runs the same code on the same
integers and genesis floats, and dp-accounting at integer RDP orders uses only IEEE arithmetic and libm's
log/exp/lgamma, so nodes agree unless two libm builds round one value differently right at a micro-epsilon boundary
(docs/PRIVACY.md, "Determinism").

Mechanisms per round:
- record: steps_per_round DP-SGD steps, each a Poisson-sampled Gaussian (rate q, multiplier z); fixed-size sampling
  is accounted as sampling without replacement (replace-one neighbours, batch round(q * n) of the shard size n).
- participant: one Gaussian mechanism with multiplier z on the aggregate (what the model's users see). Who
  participated is public, so no amplification by sampling is claimed.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from flnode.protocol.genesis import Genesis, Rules

from .dp import expected_participants, steps_per_round
from .limits import samples_cap
from .state import AppState

# Integer orders only: dp-accounting's closed-form binomial expansion (no numerical integration).
ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)
MICRO = 1_000_000
BUDGET_REASON = "privacy_budget_spent"


@functools.lru_cache(maxsize=4096)
def _epsilon(mode: str, q: float, z: float, delta: float, sampling: str, steps: int, n: int, rounds: int) -> float:
    import dp_accounting
    from dp_accounting import rdp

    if rounds <= 0:
        return 0.0
    if mode == "participant":
        acc = rdp.RdpAccountant(list(ORDERS))
        acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    elif sampling == "fixed":
        acc = rdp.RdpAccountant(list(ORDERS), dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(n, max(1, min(n, round(q * n))),
                                                               dp_accounting.GaussianDpEvent(z))
        acc.compose(event, steps * rounds)
    else:
        acc = rdp.RdpAccountant(list(ORDERS))
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps * rounds)
    return float(acc.get_epsilon(delta))


def epsilon(genesis: Genesis, author: bytes, rounds: int) -> float:
    """Epsilon (at rules.dp_delta) after `rounds` charged rounds. 0 when DP is off (no claim is made)."""
    r = genesis.rules
    if r.dp_mode == "off":
        return 0.0
    return _epsilon(r.dp_mode, r.dp_sample_rate, r.dp_noise, r.dp_delta, r.dp_sampling,
                    steps_per_round(r, genesis.task.local_epochs), _shard(genesis, author), rounds)


def _shard(genesis: Genesis, author: bytes) -> int:
    return samples_cap(genesis, author) if genesis.rules.dp_mode == "record" and genesis.rules.dp_sampling == "fixed" else 0


def epsilon_micro(genesis: Genesis, author: bytes, rounds: int) -> int:
    """Epsilon in micro-epsilon, rounded up (an integer: what consensus compares)."""
    eps = epsilon(genesis, author, rounds)
    return math.ceil(eps * MICRO) if math.isfinite(eps) else 1 << 62


def update_reader_epsilon(genesis: Genesis, rounds: int) -> float:
    """Participant level: epsilon against whoever reads the individual updates (validators, chain readers), each
    carrying only its noise share z / sqrt(m)."""
    r = genesis.rules
    if r.dp_mode != "participant" or rounds <= 0:
        return 0.0
    return _epsilon("participant", 1.0, r.dp_noise / math.sqrt(expected_participants(genesis)), r.dp_delta,
                    "poisson", 1, 0, rounds)


def budget(rules: Rules, name: str) -> float:
    """The participant's epsilon budget (0: unlimited)."""
    return float(rules.dp_budgets.get(name, rules.dp_epsilon_budget))


def budget_micro(genesis: Genesis, author: bytes) -> int | None:
    b = budget(genesis.rules, genesis.name_of(author))
    return None if genesis.rules.dp_mode == "off" or b <= 0 else math.floor(b * MICRO)


def may_spend_round(genesis: Genesis, state: AppState, author: bytes) -> bool:
    """True if one more charged round keeps `author` within its budget. The trainer asks before training; the app
    refuses an update for which this is False (reason privacy_budget_spent)."""
    cap = budget_micro(genesis, author)
    return cap is None or epsilon_micro(genesis, author, state.dp_rounds.get(author, 0) + 1) <= cap


def refusal(genesis: Genesis, state: AppState, author: bytes) -> str | None:
    return None if may_spend_round(genesis, state, author) else BUDGET_REASON


def charge(
    genesis: Genesis, state: AppState, authors: set[bytes], rejected: list[tuple[bytes, bytes, str]]
) -> dict[bytes, int]:
    """The rounds counters after a block listing updates of `authors`: each is charged one round, whatever the
    outcome (its blob is published), except an author whose update was refused for privacy_budget_spent."""
    if genesis.rules.dp_mode == "off":
        return dict(state.dp_rounds)
    out = dict(state.dp_rounds)
    for a in authors - {a for a, _, why in rejected if why == BUDGET_REASON}:
        out[a] = out.get(a, 0) + 1
    return out


def report(genesis: Genesis, state: AppState) -> list[dict[str, Any]]:
    """Per participant: rounds charged, epsilon spent and left (None: unlimited), for `chain show`/`status`."""
    r = genesis.rules
    if r.dp_mode == "off":
        return []
    rows = []
    for k in genesis.participant_keys:
        n = state.dp_rounds.get(k, 0)
        spent = epsilon_micro(genesis, k, n) / MICRO
        b = budget(r, genesis.name_of(k))
        rows.append({
            "name": genesis.name_of(k), "public_key": k.hex(), "mode": r.dp_mode, "rounds": n,
            "epsilon_spent": spent, "epsilon_budget": b if b > 0 else None,
            "epsilon_left": max(0.0, b - spent) if b > 0 else None, "delta": r.dp_delta,
            "exhausted": not may_spend_round(genesis, state, k),
            # Record-level DP runs inside the trainer: nobody else can check it was applied.
            "guarantee": "declared" if r.dp_mode == "record" else "clip and noise size checked by validators, noise randomness declared",
            "epsilon_vs_update_readers": update_reader_epsilon(genesis, n) if r.dp_mode == "participant" else None,
        })
    return rows
