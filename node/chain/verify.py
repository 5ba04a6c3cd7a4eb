"""`flnode chain verify`: replay the chain from genesis and check everything that can be checked."""

from __future__ import annotations

from dataclasses import dataclass, field

from flnode.node.app import AppState, encode_state, genesis_state
from flnode.protocol.errors import ProtocolError, ValidationError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest

from .execution import certificate_powers, check_block
from .store import ChainStore, StoreError


@dataclass
class VerifyReport:
    ok: bool
    heights: int
    first_bad_height: int | None = None
    reason: str = ""
    model_hash: str = ""
    checked: list[str] = field(default_factory=list)


def genesis_block_hash(genesis: Genesis) -> bytes:
    """What block 1 links to: the genesis itself."""
    return digest(genesis.canonical_bytes())


def verify_chain(store: ChainStore, genesis: Genesis) -> VerifyReport:
    top = store.latest_height()
    try:
        state: AppState = genesis_state(genesis)
    except ProtocolError as exc:
        return VerifyReport(False, top, 0, f"genesis: {exc}")
    prev = genesis_block_hash(genesis)
    for h in range(1, top + 1):
        try:
            block = store.get_block(h)
            cert = store.get_certificate(h)
            if block is None or cert is None:
                raise ValidationError("block or certificate missing")
            if cert.height != h or cert.block_hash != block.hash():
                raise ValidationError("certificate is for another block")
            cert.verify(genesis.chain_id, certificate_powers(genesis, state, h))  # the powers at h (slashing)
            blobs = {}
            for u in block.updates:
                blob = store.get_blob(u.blob_hash)
                if blob is not None:
                    blobs[u.blob_hash] = blob
            new_state, receipt = check_block(genesis, state, block, blobs, prev_block_hash=prev)
            row = store.state_row(h)
            if row is None:
                raise ValidationError("stored app state missing")
            if row[0] != new_state.model_hash:
                raise ValidationError("stored model hash differs from the recomputed one")
            if row[1] != encode_state(new_state):
                raise ValidationError("stored app state (balances, reputation) differs from the recomputed one")
            stored_model = store.get_blob(new_state.model_hash)
            if stored_model is None or digest(stored_model) != new_state.model_hash:
                raise ValidationError("stored model blob is missing or corrupt")
            stored_receipt = store.get_receipt(h)
            if stored_receipt is None or stored_receipt.encode() != receipt.encode():
                raise ValidationError("stored receipt (rewards, rejections) differs from the recomputed one")
        except (ValidationError, ProtocolError, StoreError) as exc:
            return VerifyReport(False, top, h, str(exc), state.model_hash.hex())
        state, prev = new_state, block.hash()
    return VerifyReport(True, top, None, "", state.model_hash.hex())
