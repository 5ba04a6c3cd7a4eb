"""`flnode chain verify`: replay the chain from genesis and check everything that can be checked.

Every height's certificate, signatures, hash links and stored state row (against the certified app hash) are
checked. Heights whose update blobs remain are also re-executed, from the stored state at the blob floor (the
oldest height whose model blob pruning keeps; genesis when nothing was pruned); the heights below it can only be
checked by their certificates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flnode.node.app import AppState, Receipt, encode_state, genesis_state
from flnode.node.app import validator_powers as powers_at
from flnode.node.app.blocks import certificate_powers, check_block
from flnode.protocol.errors import ProtocolError, ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest
from flnode.protocol.messages import Block, CommitCertificate
from flnode.protocol.tensors import BlobReader

from .store import ChainStore, StoreError


@dataclass
class VerifyReport:
    ok: bool
    heights: int
    first_bad_height: int | None = None
    reason: str = ""
    model_hash: str = ""
    checked: list[str] = field(default_factory=list)
    start_height: int = 0  # re-execution started from the stored state after this height (0: genesis)
    reexecuted: list[int] = field(default_factory=list)  # [first, last] re-executed height, [] for none
    signature_only: list[int] = field(default_factory=list)  # [first, last] checked by certificate only, [] for none

    def summary(self) -> str:
        if not self.ok:
            return f"FAILED at height {self.first_bad_height}: {self.reason}"
        if not self.signature_only:
            return f"ok: {self.heights} blocks verified from genesis; model {self.model_hash[:16]}"
        a, b = self.signature_only
        done = (f"heights {self.reexecuted[0]}-{self.reexecuted[1]} re-executed from the stored state of height "
                f"{self.start_height}" if self.reexecuted else "no height re-executed")
        return (f"ok: {self.heights} blocks verified; heights {a}-{b} by certificate, signatures and hash links only "
                f"(their blobs are pruned), {done}; model {self.model_hash[:16]}")


def genesis_block_hash(genesis: Genesis) -> bytes:
    """What block 1 links to: the genesis itself."""
    return digest(genesis.canonical_bytes())


def check_certified_link(genesis: Genesis, prev_state: AppState, prev: bytes, block: Block,
                         cert: CommitCertificate) -> None:
    """The one check that a certificate commits this block with > 2/3 of the power in force at its height, and
    that the block links to `prev` (block sync and chain verify both use it)."""
    h = block.height
    if cert.height != h or cert.block_hash != block.hash():
        raise ValidationError("certificate is for another block")
    cert.verify(genesis.chain_id, certificate_powers(genesis, prev_state, h))  # the powers at h (slashing)
    if block.header.prev_block_hash != prev:
        raise ValidationError("block does not link to the previous block")


def _check_certified(
    store: ChainStore, genesis: Genesis, prev_state: AppState, prev: bytes, h: int
) -> tuple[Block, AppState, Receipt]:
    """What needs no blob: certificate, links, last commit, and the stored state row and receipt against the
    certified header. Returns the block, the state after h (without model tensors) and the stored receipt."""
    block = store.get_block(h)
    cert = store.get_certificate(h)
    if block is None or cert is None:
        raise ValidationError("block or certificate missing")
    check_certified_link(genesis, prev_state, prev, block, cert)
    hdr = block.header
    if hdr.chain_id != genesis.chain_id or hdr.height != h:
        raise ValidationError("block header is for another chain or height")
    if hdr.proposer not in powers_at(genesis, prev_state, h):
        raise ValidationError("proposer is not a validator with power at this height")
    block.check_body()
    if h >= 2:
        lc = block.last_commit
        if lc is None or lc.height != h - 1 or lc.block_hash != prev:
            raise ValidationError("last commit is missing or for another block")
        lc.verify(genesis.chain_id, certificate_powers(genesis, prev_state, h - 1))
    row = store.state_row(h)
    if row is None:
        raise ValidationError("stored app state missing")
    state = store.light_state(h)
    if row[0] != hdr.model_hash or state.hash() != hdr.app_hash or state.height != h:
        raise ValidationError("stored app state (balances, reputation) differs from the certified app hash")
    receipt = store.get_receipt(h)
    if receipt is None or receipt.hash() != state.last_receipt_hash:
        raise ValidationError("stored receipt (rewards, rejections) differs from the certified one")
    return block, state, receipt


def _reexecute(
    store: ChainStore, genesis: Genesis, state: AppState, block: Block, prev: bytes, receipt: Receipt
) -> AppState | None:
    """Re-execute one block on `state`; None if one of its update blobs is gone (pruned meanwhile)."""
    h = block.height
    blobs: dict[bytes, BlobReader] = {}
    for u in block.updates:
        blob = store.blobs.reader(u.blob_hash)  # hash-checked once, then read a chunk at a time (large models)
        if blob is not None:
            blobs[u.blob_hash] = blob
        elif store.blobs.floor() >= h:
            return None
    new_state, recomputed = check_block(genesis, state, block, blobs, prev_block_hash=prev)
    row = store.state_row(h)
    if row is None or row[0] != new_state.model_hash:
        raise ValidationError("stored model hash differs from the recomputed one")
    if row[1] != encode_state(new_state):
        raise ValidationError("stored app state (balances, reputation) differs from the recomputed one")
    if store.blobs.reader(new_state.model_hash) is None:  # None: missing, or does not hash to its name
        raise ValidationError("stored model blob is missing or corrupt")
    if receipt.encode() != recomputed.encode():
        raise ValidationError("stored receipt (rewards, rejections) differs from the recomputed one")
    return new_state


def verify_chain(store: ChainStore, genesis: Genesis) -> VerifyReport:
    top = store.latest_height()
    try:
        light: AppState = genesis_state(genesis)
    except ProtocolError as exc:
        return VerifyReport(False, top, 0, f"genesis: {exc}")
    start = min(store.blobs.floor(), top)
    full: AppState | None = light if start == 0 else None  # the state re-execution goes on from
    prev = genesis_block_hash(genesis)
    first_exec: int | None = None
    h = 0
    try:
        for h in range(1, top + 1):
            block, state, receipt = _check_certified(store, genesis, light, prev, h)
            if full is not None:
                full = _reexecute(store, genesis, full, block, prev, receipt)
                if full is None:  # pruned while we were verifying: re-execution restarts at the new floor
                    start, first_exec = min(store.blobs.floor(), top), None
                elif first_exec is None:
                    first_exec = h
            if full is None and h == start:
                full = store.get_state(h)  # the model blob pruning keeps; its hash was checked just above
            light, prev = state, block.hash()
    except (ValidationError, ProtocolError, StoreError) as exc:
        return VerifyReport(False, top, h, str(exc), light.model_hash.hex())
    return VerifyReport(
        True, top, None, "", light.model_hash.hex(), start_height=start,
        reexecuted=[first_exec, top] if first_exec is not None else [],
        signature_only=[1, start] if start > 0 else [],
    )
