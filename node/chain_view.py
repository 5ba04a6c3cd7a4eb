"""What the admission gate reads of the node's position (admission.ChainView): the head, the machine's round,
and the rules an announcement or membership transaction must pass at the height it names."""

from __future__ import annotations

from typing import Any

from flnode.consensus import ValidatorSet
from flnode.node.app import check_announcement_admission
from flnode.node.app.membership import trains_at
from flnode.protocol.genesis import Genesis
from flnode.protocol.membership import MembershipTx
from flnode.protocol.messages import UpdateAnnouncement

from .head import Head
from .member_txs import MemberTxs


class NodeChainView:
    def __init__(self, genesis: Genesis, head: Head, machine: Any, members: MemberTxs) -> None:
        self.genesis, self.head, self.machine, self.members = genesis, head, machine, members

    def next_height(self) -> int:
        return self.head.next_height

    def consensus_round(self) -> int:
        return max(0, int(getattr(self.machine, "round", 0)))

    def validator_set(self, height: int) -> ValidatorSet | None:
        return self.head.validator_set(height)

    def membership_problem(self, tx: MembershipTx) -> str | None:
        return self.members.problem(tx)

    def announcement_problem(self, ann: UpdateAnnouncement) -> str | None:
        """Why `ann` is refused, or None. For the next height (the one being decided) this includes the
        signature; for the one after, only what can be checked before that height's base model is known."""
        state = self.head.state
        if ann.height == state.height + 1:
            reason = check_announcement_admission(self.genesis, state, ann)
            return None if reason is None else str(getattr(reason, "value", reason))
        if not trains_at(self.genesis, state, ann.author, ann.height):
            return "not_participant"
        if state.excluded(ann.author, self.genesis.rules.rewards.exclude_below):
            return "excluded"
        if ann.blob_size > self.genesis.rules.max_blob_bytes:
            return "oversize"
        return None
