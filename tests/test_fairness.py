"""A proposer that censors honest updates gets no prevote (node/app/fairness.py), pure."""

from __future__ import annotations

import numpy as np
from flnode.node.app import genesis_state, task_for
from flnode.node.app.blocks import build_block
from flnode.node.app.fairness import GRACE_S, unfair_reason
from flnode.node.chain.verify import genesis_block_hash
from flnode.protocol.hashing import digest
from flnode.protocol.messages import UpdateAnnouncement
from flnode.protocol.tensors import encode_tensors
from test_membership import VALS, genesis

G = genesis("genesis", max_members=0, max_samples_per_update=0)
S0 = genesis_state(G)
BLOB = encode_tensors({n: np.zeros(sh, np.float32) for n, sh in task_for(G.task).param_spec()})


def ann(i: int) -> UpdateAnnouncement:
    a = UpdateAnnouncement(1, S0.model_hash, digest(BLOB), len(BLOB), 10 + i, 0, 0, VALS[i].public_key)
    return a.signed(VALS[i], G.chain_id)


def block_of(authors: list[int]):  # type: ignore[no-untyped-def]
    return build_block(G, S0, prev_block_hash=genesis_block_hash(G), last_commit=None, proposer=VALS[0].public_key,
                       time_ms=0, candidates=[(ann(i), BLOB) for i in authors])[0]


def test_own_only_block_is_unfair_when_others_were_held() -> None:
    held = [(ann(i), 0.0) for i in range(4)]  # every update held since t = 0
    own_only = block_of([0])
    why = unfair_reason(G, S0, own_only, held, received_at=2.5, deadline=2.0)
    assert why is not None and "omits" in why and "v1" in why
    assert unfair_reason(G, S0, block_of([0, 1, 2, 3]), held, received_at=2.5, deadline=2.0) is None


def test_updates_that_arrived_just_before_the_proposal_may_be_missing() -> None:
    held = [(ann(0), 0.0), (ann(1), 0.0), (ann(2), 0.0), (ann(3), 2.5 - GRACE_S / 2)]
    assert unfair_reason(G, S0, block_of([0, 1, 2]), held, received_at=2.5, deadline=2.0) is None
    late = [(a, t) for a, t in held]
    late[3] = (ann(3), 2.5 - 2 * GRACE_S)
    assert unfair_reason(G, S0, block_of([0, 1, 2]), late, received_at=2.5, deadline=2.0) is not None


def test_a_short_block_long_before_the_deadline_is_unfair() -> None:
    why = unfair_reason(G, S0, block_of([0]), [(ann(0), 0.0)], received_at=0.1, deadline=2.0)
    assert why is not None and "before the collection deadline" in why
    # after a restart the node does not know when the height began: only the omission rule applies
    assert unfair_reason(G, S0, block_of([0]), [(ann(0), 0.0)], received_at=0.1, deadline=None) is None
