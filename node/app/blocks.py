"""Building a block (the proposer) and checking one (every validator, and the audit). Pure: no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

from flnode.node.app import AppState, Receipt, check_announcement_admission, evidence_key, execute
from flnode.node.app import validator_powers as powers_at
from flnode.node.app.membership import apply_txs, ever_validator
from flnode.protocol.errors import ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import short
from flnode.protocol.membership import MembershipTx
from flnode.protocol.messages import (
    Block,
    BlockHeader,
    CommitCertificate,
    DuplicateVoteEvidence,
    UpdateAnnouncement,
    empty_commit_hash,
    list_hash,
)
from flnode.protocol.tensors import BlobReader

Blob: TypeAlias = "bytes | BlobReader"  # an update blob in memory, or its file read a chunk at a time


def select_updates(
    genesis: Genesis, state: AppState, candidates: Sequence[tuple[UpdateAnnouncement, Blob]]
) -> list[tuple[UpdateAnnouncement, Blob]]:
    """Candidates that may go into the next block (admissible: see check_announcement_admission), in canonical
    (hash) order. An author's second, different announcement is kept too: together they prove equivocation,
    which execution penalises."""
    seen: dict[bytes, tuple[UpdateAnnouncement, Blob]] = {}
    for ann, blob in candidates:
        if check_announcement_admission(genesis, state, ann) is None:
            seen.setdefault(ann.hash(), (ann, blob))
    return [seen[h] for h in sorted(seen)]


def build_block(
    genesis: Genesis,
    state: AppState,
    *,
    prev_block_hash: bytes,
    last_commit: CommitCertificate | None,
    proposer: bytes,
    time_ms: int,
    candidates: Sequence[tuple[UpdateAnnouncement, Blob]],
    evidence: Sequence[DuplicateVoteEvidence] = (),
    txs: Sequence[MembershipTx] = (),
) -> tuple[Block, AppState, Receipt]:
    chosen = select_updates(genesis, state, candidates)
    chosen_txs = select_txs(genesis, state, txs)
    fresh: dict[tuple[bytes, int, int, int], DuplicateVoteEvidence] = {}
    for e in sorted(evidence, key=lambda e: e.hash()):
        k = evidence_key(e)
        if k not in state.punished and ever_validator(genesis, state, e.validator):
            fresh.setdefault(k, e)  # one piece of evidence per equivocation
    evs = sorted({e.hash(): e for e in fresh.values()}.items())
    evidence_list = tuple(e for _, e in evs)
    new_state, receipt = execute(genesis, state, chosen, evidence_list, chosen_txs)
    updates = tuple(a for a, _ in chosen)
    header = BlockHeader(
        chain_id=genesis.chain_id,
        height=state.height + 1,
        prev_block_hash=prev_block_hash,
        proposer=proposer,
        time_ms=time_ms,
        updates_hash=list_hash(updates),
        evidence_hash=list_hash(evidence_list),
        last_commit_hash=last_commit.hash() if last_commit is not None else empty_commit_hash(),
        model_hash=new_state.model_hash,
        app_hash=new_state.hash(),
        txs_hash=list_hash(chosen_txs) if chosen_txs else None,
    )
    return Block(header, updates, evidence_list, last_commit, chosen_txs), new_state, receipt


def select_txs(genesis: Genesis, state: AppState, txs: Sequence[MembershipTx]) -> tuple[MembershipTx, ...]:
    """The mempool's membership transactions that may go into the next block, in the order given (each checked
    against the state the earlier ones leave)."""
    if not txs:
        return ()
    powers = powers_at(genesis, state, state.height + 1)
    _, applied = apply_txs(genesis, state, txs, powers, dict(state.balances), dict(state.reputation),
                           skip_invalid=True)
    return tuple(applied)


def missing_blobs(block: Block, have: Callable[[bytes], bool]) -> list[bytes]:
    return sorted({u.blob_hash for u in block.updates if not have(u.blob_hash)})


def certificate_powers(genesis: Genesis, state: AppState, height: int) -> dict[bytes, int]:
    """Powers for checking a commit certificate of `height`: those in force then, and zero for slashed
    validators, so a valid signature of theirs is still accepted but no longer counts."""
    joined = [k for k, m in state.membership.members.items() if m.power > 0]  # admitted, removed or left
    return {**dict.fromkeys(genesis.powers, 0), **dict.fromkeys(joined, 0), **powers_at(genesis, state, height)}


def check_block(
    genesis: Genesis,
    state: AppState,
    block: Block,
    blobs: Mapping[bytes, Blob],
    *,
    prev_block_hash: bytes,
    validator_powers: Mapping[bytes, int] | None = None,
) -> tuple[AppState, Receipt]:
    """Re-execute a proposed or stored block; raise ValidationError naming the first thing wrong.

    The proposer must hold power at this height and the last commit is checked with the powers at the previous
    height, both taken from genesis and `state` (slashing). `validator_powers` is ignored, kept for old callers."""
    hdr = block.header
    if hdr.chain_id != genesis.chain_id:
        raise ValidationError(f"block is for chain {hdr.chain_id!r}")
    if hdr.height != state.height + 1:
        raise ValidationError(f"block height {hdr.height}, expected {state.height + 1}")
    if hdr.prev_block_hash != prev_block_hash:
        raise ValidationError("block does not link to the previous block")
    if hdr.proposer not in powers_at(genesis, state, hdr.height):
        raise ValidationError("proposer is not a validator with power at this height")
    block.check_body()
    if hdr.height >= 2:
        lc = block.last_commit
        if lc is None:
            raise ValidationError("block lacks the previous block's commit")
        if lc.height != hdr.height - 1 or lc.block_hash != prev_block_hash:
            raise ValidationError("last commit is for another block")
        lc.verify(genesis.chain_id, certificate_powers(genesis, state, hdr.height - 1))
    elif block.last_commit is not None:
        raise ValidationError("the first block carries no last commit")
    if [u.hash() for u in block.updates] != sorted(u.hash() for u in block.updates):
        raise ValidationError("updates are not in canonical order")
    if [e.hash() for e in block.evidence] != sorted({e.hash() for e in block.evidence}):
        raise ValidationError("evidence is not in canonical order or repeats")
    pairs: list[tuple[UpdateAnnouncement, Blob]] = []
    for u in block.updates:
        blob = blobs.get(u.blob_hash)
        if blob is None:
            raise ValidationError(f"blob {short(u.blob_hash)} of {genesis.name_of(u.author)}'s update is missing")
        pairs.append((u, blob))
    new_state, receipt = execute(genesis, state, pairs, block.evidence, block.txs)
    if new_state.model_hash != hdr.model_hash:
        raise ValidationError(
            f"model hash differs: block claims {short(hdr.model_hash)}, re-execution gives {short(new_state.model_hash)}"
        )
    if new_state.hash() != hdr.app_hash:
        raise ValidationError(
            f"app hash differs: block claims {short(hdr.app_hash)}, re-execution gives {short(new_state.hash())}"
        )
    return new_state, receipt
