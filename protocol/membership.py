"""Membership transactions: join, admit, refuse, remove, leave. Signed, canonical, size-capped.

One message type with a kind, so a block carries one list and gossip one tag. Replay protection without
per-account nonces: a transaction names the height its signer had seen and is valid only in the TX_TTL blocks
after it; the app remembers applied transactions until they expire (node/app/membership.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any, ClassVar

from . import crypto
from .base import MAX_HEIGHT, Message
from .encoding import expect_bytes, expect_int, expect_list, expect_str, pack_trusted
from .errors import DecodeError

TX_TTL = 64  # a transaction signed after height t may be included in blocks t+1 .. t+TX_TTL
MAX_TXS_PER_BLOCK = 64
MONIKER_MAX = 32
MAX_SAMPLES = 1 << 40


class TxKind(IntEnum):
    JOIN = 1
    ADMIT = 2
    REMOVE = 3
    LEAVE = 4
    REFUSE = 5  # a validator's vote against a join request


class Role(IntEnum):
    TRAINER = 1  # publishes updates, earns rewards, never signs consensus messages
    VALIDATOR = 2  # votes
    BOTH = 3

    @property
    def trains(self) -> bool:
        return bool(self & Role.TRAINER)

    @property
    def validates(self) -> bool:
        return bool(self & Role.VALIDATOR)

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r} (trainer | validator | both)") from None


@dataclass(frozen=True)
class MembershipTx(Message):
    """`signer` signs; `target` is the member acted on (the signer itself for join and leave). The join fields
    (role, samples, moniker, data_seed) are zero or empty for the other kinds, so every tx has one encoding."""

    MAX_SIZE: ClassVar[int] = 256
    KIND: ClassVar[str] = "membership"
    kind: TxKind
    signer: bytes
    height: int  # the last height the signer had seen committed
    target: bytes
    role: int = 0
    samples: int = 0  # declared sample count: the most this trainer may ever declare in an update
    moniker: str = ""
    data_seed: int = 0  # chooses the built-in data set's shard
    signature: bytes = b""

    @classmethod
    def join(cls, key: crypto.NodeKey, chain_id: str, height: int, role: Role, samples: int, moniker: str,
             data_seed: int) -> MembershipTx:
        pk = key.public_key
        return cls(TxKind.JOIN, pk, height, pk, int(role), samples, moniker, data_seed).signed(key, chain_id)

    @classmethod
    def vote(cls, kind: TxKind, key: crypto.NodeKey, chain_id: str, height: int, target: bytes) -> MembershipTx:
        if kind not in (TxKind.ADMIT, TxKind.REFUSE, TxKind.REMOVE):
            raise ValueError("vote: admit, refuse or remove")
        return cls(kind, key.public_key, height, target).signed(key, chain_id)

    @classmethod
    def leave(cls, key: crypto.NodeKey, chain_id: str, height: int) -> MembershipTx:
        pk = key.public_key
        return cls(TxKind.LEAVE, pk, height, pk).signed(key, chain_id)

    def to_list(self) -> list[Any]:
        return [int(self.kind), self.signer, self.height, self.target, self.role, self.samples, self.moniker,
                self.data_seed, self.signature]

    def sign_payload(self) -> bytes:
        return pack_trusted(self.to_list()[:-1])

    def signed(self, key: crypto.NodeKey, chain_id: str) -> MembershipTx:
        self.check_form()
        return replace(self, signature=key.sign(chain_id, self.KIND, self.sign_payload()))

    def verify(self, chain_id: str) -> bool:
        return crypto.verify(self.signer, chain_id, self.KIND, self.sign_payload(), self.signature)

    def check_form(self) -> None:
        """The canonical form: join fields only on a join, target = signer for join and leave."""
        if self.kind in (TxKind.JOIN, TxKind.LEAVE) and self.target != self.signer:
            raise DecodeError("membership: join and leave act on the signer")
        if self.kind == TxKind.JOIN:
            if self.role not in (1, 2, 3) or not 1 <= self.samples <= MAX_SAMPLES or not self.moniker:
                raise DecodeError("membership: a join needs a role, 1 or more samples and a moniker")
            if not self.moniker.isprintable() or self.moniker.strip() != self.moniker:
                raise DecodeError("membership: moniker must be printable without surrounding spaces")
        elif (self.role, self.samples, self.moniker, self.data_seed) != (0, 0, "", 0):
            raise DecodeError("membership: only a join carries role, samples, moniker and data seed")

    @classmethod
    def from_list(cls, value: Any) -> MembershipTx:
        k, signer, h, target, role, n, moniker, seed, sig = expect_list(value, 9, "membership tx")
        tx = cls(
            TxKind(expect_int(k, "tx kind", 1, 5)),
            expect_bytes(signer, "signer", crypto.PUBKEY_LEN),
            expect_int(h, "height", 0, MAX_HEIGHT),
            expect_bytes(target, "target", crypto.PUBKEY_LEN),
            expect_int(role, "role", 0, 3),
            expect_int(n, "samples", 0, MAX_SAMPLES),
            expect_str(moniker, "moniker", MONIKER_MAX),
            expect_int(seed, "data seed", 0, (1 << 63) - 1),
            expect_bytes(sig, "signature", crypto.SIGNATURE_LEN),
        )
        tx.check_form()
        return tx

    def describe(self) -> str:
        kind = self.kind.name.lower()
        if self.kind == TxKind.JOIN:
            return f"join {self.moniker} as {Role(self.role).name.lower()} ({self.samples} samples)"
        if self.kind == TxKind.LEAVE:
            return f"leave {self.signer.hex()[:12]}"
        return f"{kind} {self.target.hex()[:12]} by {self.signer.hex()[:12]}"


def decode_txs(value: Any) -> tuple[MembershipTx, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_TXS_PER_BLOCK:
        raise DecodeError("block: bad membership tx list")
    return tuple(MembershipTx.from_list(t) for t in value)
