"""Typed wire messages. Each is a frozen dataclass with a fixed-order array encoding and a size cap.

`encode()` gives canonical bytes; `decode()` accepts only those (or raises a ProtocolError). Signed messages
expose `sign_payload()` (the bytes the signature covers, without the signature) and `verify(chain_id)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum
from functools import cached_property
from typing import Any, ClassVar

from . import crypto
from .base import MAX_HEIGHT, Message
from .encoding import expect_bytes, expect_int, expect_list, expect_str, pack_trusted, unpack
from .errors import DecodeError, ValidationError
from .hashing import HASH_LEN, digest
from .membership import MembershipTx, decode_txs

pack = pack_trusted  # messages are built by typed constructors; decoding re-checks strictly

PK = crypto.PUBKEY_LEN
SIG = crypto.SIGNATURE_LEN
MAX_ROUND = (1 << 20)
MAX_VALIDATORS = 1024
MAX_UPDATES_PER_BLOCK = 1024
MAX_EVIDENCE_PER_BLOCK = 256


def _hash(v: Any, what: str) -> bytes:
    return expect_bytes(v, what, HASH_LEN)


def _opt_hash(v: Any, what: str) -> bytes | None:
    return None if v is None else _hash(v, what)


class VoteType(IntEnum):
    PREVOTE = 1
    PRECOMMIT = 2


@dataclass(frozen=True)
class Vote(Message):
    """A prevote or precommit for a block hash, or for nil (block_hash None)."""

    MAX_SIZE: ClassVar[int] = 256
    KIND: ClassVar[str] = "vote"
    type: VoteType
    height: int
    round: int
    block_hash: bytes | None
    validator: bytes
    signature: bytes = b""

    def sign_payload(self) -> bytes:
        return pack([int(self.type), self.height, self.round, self.block_hash, self.validator])

    def signed(self, key: crypto.NodeKey, chain_id: str) -> Vote:
        return replace(self, signature=key.sign(chain_id, self.KIND, self.sign_payload()))

    def verify(self, chain_id: str) -> bool:
        return crypto.verify(self.validator, chain_id, self.KIND, self.sign_payload(), self.signature)

    def to_list(self) -> list[Any]:
        return [int(self.type), self.height, self.round, self.block_hash, self.validator, self.signature]

    @classmethod
    def from_list(cls, value: Any) -> Vote:
        t, h, r, bh, v, s = expect_list(value, 6, "vote")
        t = expect_int(t, "vote type", 1, 2)
        return cls(
            VoteType(t),
            expect_int(h, "height", 0, MAX_HEIGHT),
            expect_int(r, "round", 0, MAX_ROUND),
            _opt_hash(bh, "block hash"),
            expect_bytes(v, "validator", PK),
            expect_bytes(s, "signature", SIG),
        )


@dataclass(frozen=True)
class UpdateAnnouncement(Message):
    """A participant's signed claim: 'for height H, on base model B, my update is blob X'."""

    MAX_SIZE: ClassVar[int] = 512
    KIND: ClassVar[str] = "update"
    height: int
    base_model_hash: bytes
    blob_hash: bytes
    blob_size: int
    num_samples: int
    loss_ppm: int  # local training loss x 1e6, an integer so the signed bytes hold no floats
    accuracy_ppm: int  # local accuracy x 1e6
    author: bytes
    signature: bytes = b""

    def sign_payload(self) -> bytes:
        return pack(self.to_list()[:-1])

    def signed(self, key: crypto.NodeKey, chain_id: str) -> UpdateAnnouncement:
        return replace(self, signature=key.sign(chain_id, self.KIND, self.sign_payload()))

    def verify(self, chain_id: str) -> bool:
        return crypto.verify(self.author, chain_id, self.KIND, self.sign_payload(), self.signature)

    def to_list(self) -> list[Any]:
        return [
            self.height,
            self.base_model_hash,
            self.blob_hash,
            self.blob_size,
            self.num_samples,
            self.loss_ppm,
            self.accuracy_ppm,
            self.author,
            self.signature,
        ]

    @classmethod
    def from_list(cls, value: Any) -> UpdateAnnouncement:
        h, base, blob, size, n, loss, acc, author, sig = expect_list(value, 9, "update")
        return cls(
            expect_int(h, "height", 1, MAX_HEIGHT),
            _hash(base, "base model hash"),
            _hash(blob, "blob hash"),
            expect_int(size, "blob size", 1, 1 << 40),
            expect_int(n, "sample count", 1, 1 << 40),
            expect_int(loss, "loss", 0, 1 << 62),
            expect_int(acc, "accuracy", 0, 1_000_000),
            expect_bytes(author, "author", PK),
            expect_bytes(sig, "signature", SIG),
        )


@dataclass(frozen=True)
class DuplicateVoteEvidence(Message):
    """Two conflicting signed votes from one validator for the same (height, round, type)."""

    MAX_SIZE: ClassVar[int] = 600
    KIND: ClassVar[str] = "evidence"
    vote_a: Vote
    vote_b: Vote

    def to_list(self) -> list[Any]:
        return [self.vote_a.to_list(), self.vote_b.to_list()]

    @classmethod
    def from_list(cls, value: Any) -> DuplicateVoteEvidence:
        a, b = expect_list(value, 2, "evidence")
        return cls(Vote.from_list(a), Vote.from_list(b))

    @property
    def validator(self) -> bytes:
        return self.vote_a.validator

    def check(self, chain_id: str) -> None:
        a, b = self.vote_a, self.vote_b
        if (a.validator, a.height, a.round, a.type) != (b.validator, b.height, b.round, b.type):
            raise ValidationError("evidence: votes are not for the same validator/height/round/type")
        if a.block_hash == b.block_hash:
            raise ValidationError("evidence: votes do not conflict")
        if a.encode() >= b.encode():
            raise ValidationError("evidence: votes must be in canonical (byte) order")
        if not (a.verify(chain_id) and b.verify(chain_id)):
            raise ValidationError("evidence: a vote's signature is bad")

    @classmethod
    def of(cls, a: Vote, b: Vote) -> DuplicateVoteEvidence:
        return cls(a, b) if a.encode() < b.encode() else cls(b, a)


@dataclass(frozen=True)
class CommitCertificate(Message):
    """2/3+ of voting power precommitted block_hash at (height, round)."""

    MAX_SIZE: ClassVar[int] = 128 * MAX_VALIDATORS + 256
    KIND: ClassVar[str] = "commit"
    height: int
    round: int
    block_hash: bytes
    signatures: tuple[tuple[bytes, bytes], ...]  # (validator, precommit signature), sorted by validator

    def to_list(self) -> list[Any]:
        return [self.height, self.round, self.block_hash, [[v, s] for v, s in self.signatures]]

    @classmethod
    def from_list(cls, value: Any) -> CommitCertificate:
        h, r, bh, sigs = expect_list(value, 4, "commit")
        if not isinstance(sigs, list) or len(sigs) > MAX_VALIDATORS:
            raise DecodeError("commit: bad signature list")
        pairs = []
        for item in sigs:
            v, s = expect_list(item, 2, "commit signature")
            pairs.append((expect_bytes(v, "validator", PK), expect_bytes(s, "signature", SIG)))
        if [p[0] for p in pairs] != sorted({p[0] for p in pairs}):
            raise DecodeError("commit: validators must be sorted and unique")
        return cls(
            expect_int(h, "height", 0, MAX_HEIGHT), expect_int(r, "round", 0, MAX_ROUND), _hash(bh, "block hash"),
            tuple(pairs),
        )

    def precommit(self, validator: bytes, signature: bytes) -> Vote:
        return Vote(VoteType.PRECOMMIT, self.height, self.round, self.block_hash, validator, signature)

    def verify(self, chain_id: str, powers: dict[bytes, int]) -> None:
        """Raise ValidationError unless the signers hold more than 2/3 of the total voting power."""
        total = sum(powers.values())
        signed = 0
        for v, s in self.signatures:
            if v not in powers:
                raise ValidationError(f"commit: {v.hex()[:12]} is not a validator")
            if not self.precommit(v, s).verify(chain_id):
                raise ValidationError(f"commit: bad precommit signature from {v.hex()[:12]}")
            signed += powers[v]
        if 3 * signed <= 2 * total:
            raise ValidationError(f"commit: signers hold {signed} of {total} voting power, not more than 2/3")


@dataclass(frozen=True)
class BlockHeader(Message):
    """The header commits to the body and to the result of executing it (model and app state after the block)."""

    MAX_SIZE: ClassVar[int] = 1024
    KIND: ClassVar[str] = "header"
    chain_id: str
    height: int
    prev_block_hash: bytes
    proposer: bytes
    time_ms: int  # proposer's clock, informational only: never an input to execution
    updates_hash: bytes
    evidence_hash: bytes
    last_commit_hash: bytes
    model_hash: bytes
    app_hash: bytes
    txs_hash: bytes | None = None  # membership transactions; absent, not hashed, when there are none

    def to_list(self) -> list[Any]:
        return [
            self.chain_id, self.height, self.prev_block_hash, self.proposer, self.time_ms, self.updates_hash,
            self.evidence_hash, self.last_commit_hash, self.model_hash, self.app_hash,
        ] + ([] if self.txs_hash is None else [self.txs_hash])

    @classmethod
    def from_list(cls, value: Any) -> BlockHeader:
        n = len(value) if isinstance(value, list) and len(value) == 11 else 10
        cid, h, prev, prop, t, uh, eh, lch, mh, ah, *th = expect_list(value, n, "header")
        return cls(
            expect_str(cid, "chain id", 64), expect_int(h, "height", 1, MAX_HEIGHT), _hash(prev, "prev block hash"),
            expect_bytes(prop, "proposer", PK), expect_int(t, "time", 0, 1 << 62), _hash(uh, "updates hash"),
            _hash(eh, "evidence hash"), _hash(lch, "last commit hash"), _hash(mh, "model hash"), _hash(ah, "app hash"),
            _hash(th[0], "txs hash") if th else None,
        )


def list_hash(items: tuple[Message, ...] | list[Message]) -> bytes:
    return digest(pack([i.hash() for i in items]))


@dataclass(frozen=True)
class Block(Message):
    MAX_SIZE: ClassVar[int] = 1 << 20
    KIND: ClassVar[str] = "block"
    header: BlockHeader
    updates: tuple[UpdateAnnouncement, ...] = ()
    evidence: tuple[DuplicateVoteEvidence, ...] = ()
    last_commit: CommitCertificate | None = None
    txs: tuple[MembershipTx, ...] = ()  # membership transactions; encoded (5th field) only when there are some

    def to_list(self) -> list[Any]:
        return [
            self.header.to_list(),
            [u.to_list() for u in self.updates],
            [e.to_list() for e in self.evidence],
            None if self.last_commit is None else self.last_commit.to_list(),
        ] + ([[t.to_list() for t in self.txs]] if self.txs else [])

    @classmethod
    def from_list(cls, value: Any) -> Block:
        n = 5 if isinstance(value, list) and len(value) == 5 else 4
        hdr, ups, evs, lc, *txs = expect_list(value, n, "block")
        if not isinstance(ups, list) or len(ups) > MAX_UPDATES_PER_BLOCK:
            raise DecodeError("block: bad update list")
        if not isinstance(evs, list) or len(evs) > MAX_EVIDENCE_PER_BLOCK:
            raise DecodeError("block: bad evidence list")
        block = cls(
            BlockHeader.from_list(hdr),
            tuple(UpdateAnnouncement.from_list(u) for u in ups),
            tuple(DuplicateVoteEvidence.from_list(e) for e in evs),
            None if lc is None else CommitCertificate.from_list(lc),
            decode_txs(txs[0]) if txs else (),  # a present list is non-empty: one encoding per block
        )
        # A block is named (and signed) by its header only, so a body that does not match the header must not
        # exist as a Block: otherwise a relayer could swap it under a valid proposal signature.
        try:
            block.check_body()
        except ValidationError as exc:
            raise DecodeError(str(exc)) from None
        return block

    @property
    def height(self) -> int:
        return self.header.height

    @cached_property
    def _header_hash(self) -> bytes:
        return self.header.hash()

    def hash(self) -> bytes:
        """A block is named by its header; the header commits to the body."""
        return self._header_hash

    def check_body(self) -> None:
        """The body matches the header's commitments (not yet whether its content is valid)."""
        if list_hash(self.updates) != self.header.updates_hash:
            raise ValidationError("block: updates do not match the header")
        if list_hash(self.evidence) != self.header.evidence_hash:
            raise ValidationError("block: evidence does not match the header")
        if (list_hash(self.txs) if self.txs else None) != self.header.txs_hash:
            raise ValidationError("block: membership transactions do not match the header")
        lch = digest(b"") if self.last_commit is None else self.last_commit.hash()
        if lch != self.header.last_commit_hash:
            raise ValidationError("block: last commit does not match the header")


def empty_commit_hash() -> bytes:
    return digest(b"")


@dataclass(frozen=True)
class Proposal(Message):
    """The proposer's block for (height, round); pol_round >= 0 re-proposes a value locked in that round."""

    MAX_SIZE: ClassVar[int] = Block.MAX_SIZE + 512
    KIND: ClassVar[str] = "proposal"
    height: int
    round: int
    pol_round: int  # -1 when there is no proof of lock
    block: Block
    proposer: bytes
    signature: bytes = b""

    @property
    def block_hash(self) -> bytes:
        return self.block.hash()  # cached on the block

    def sign_payload(self) -> bytes:
        return pack([self.height, self.round, self.pol_round, self.block_hash, self.proposer])

    def signed(self, key: crypto.NodeKey, chain_id: str) -> Proposal:
        return replace(self, signature=key.sign(chain_id, self.KIND, self.sign_payload()))

    def verify(self, chain_id: str) -> bool:
        return crypto.verify(self.proposer, chain_id, self.KIND, self.sign_payload(), self.signature)

    def to_list(self) -> list[Any]:
        return [self.height, self.round, self.pol_round, self.block.to_list(), self.proposer, self.signature]

    @classmethod
    def from_list(cls, value: Any) -> Proposal:
        h, r, pr, blk, prop, sig = expect_list(value, 6, "proposal")
        return cls(
            expect_int(h, "height", 1, MAX_HEIGHT), expect_int(r, "round", 0, MAX_ROUND),
            expect_int(pr, "pol round", -1, MAX_ROUND), Block.from_list(blk), expect_bytes(prop, "proposer", PK),
            expect_bytes(sig, "signature", SIG),
        )


# ---- request/response messages for direct streams ----


@dataclass(frozen=True)
class BlobRequest(Message):
    MAX_SIZE: ClassVar[int] = 64
    KIND: ClassVar[str] = "blob_request"
    blob_hash: bytes

    def to_list(self) -> list[Any]:
        return [self.blob_hash]

    @classmethod
    def from_list(cls, value: Any) -> BlobRequest:
        (bh,) = expect_list(value, 1, "blob request")
        return cls(_hash(bh, "blob hash"))


@dataclass(frozen=True)
class BlockRequest(Message):
    MAX_SIZE: ClassVar[int] = 64
    KIND: ClassVar[str] = "block_request"
    from_height: int
    max_blocks: int

    def to_list(self) -> list[Any]:
        return [self.from_height, self.max_blocks]

    @classmethod
    def from_list(cls, value: Any) -> BlockRequest:
        fh, mb = expect_list(value, 2, "block request")
        return cls(expect_int(fh, "from height", 1, MAX_HEIGHT), expect_int(mb, "max blocks", 1, 256))


@dataclass(frozen=True)
class BlockResponse(Message):
    """Committed blocks with their certificates, consecutive from the requested height."""

    MAX_SIZE: ClassVar[int] = 16 << 20
    KIND: ClassVar[str] = "block_response"
    entries: tuple[tuple[Block, CommitCertificate], ...] = field(default_factory=tuple)

    def to_list(self) -> list[Any]:
        return [[[b.to_list(), c.to_list()] for b, c in self.entries]]

    @classmethod
    def from_list(cls, value: Any) -> BlockResponse:
        (items,) = expect_list(value, 1, "block response")
        if not isinstance(items, list) or len(items) > 256:
            raise DecodeError("block response: bad entry list")
        out = []
        for item in items:
            b, c = expect_list(item, 2, "block entry")
            out.append((Block.from_list(b), CommitCertificate.from_list(c)))
        return cls(tuple(out))


@dataclass(frozen=True)
class Status(Message):
    """A peer's tip, exchanged so that a node behind knows to sync."""

    MAX_SIZE: ClassVar[int] = 128
    KIND: ClassVar[str] = "status"
    height: int
    block_hash: bytes
    model_hash: bytes

    def to_list(self) -> list[Any]:
        return [self.height, self.block_hash, self.model_hash]

    @classmethod
    def from_list(cls, value: Any) -> Status:
        h, bh, mh = expect_list(value, 3, "status")
        return cls(expect_int(h, "height", 0, MAX_HEIGHT), _hash(bh, "block hash"), _hash(mh, "model hash"))


@dataclass(frozen=True)
class UpdateBundle(Message):
    """A small update travelling inline with its announcement, saving every peer a blob request.

    The blob is content addressed by the signed announcement (blob_hash), so it needs no signature of its own.
    Only updates up to INLINE_MAX bytes travel this way; bigger ones are fetched over streams.
    """

    INLINE_MAX: ClassVar[int] = 64 << 10
    MAX_SIZE: ClassVar[int] = UpdateAnnouncement.MAX_SIZE + INLINE_MAX + 64
    KIND: ClassVar[str] = "update_bundle"
    announcement: UpdateAnnouncement
    blob: bytes

    def to_list(self) -> list[Any]:
        return [self.announcement.to_list(), self.blob]

    @classmethod
    def from_list(cls, value: Any) -> UpdateBundle:
        ann, blob = expect_list(value, 2, "update bundle")
        a = UpdateAnnouncement.from_list(ann)
        b = expect_bytes(blob, "inline blob", max_len=cls.INLINE_MAX)
        if len(b) != a.blob_size or digest(b) != a.blob_hash:
            raise ValidationError("update bundle: blob does not match its announcement")
        return cls(a, b)


# ---- gossip envelope ----

GOSSIP_TYPES: dict[int, type[Message]] = {
    1: Proposal, 2: Vote, 3: UpdateAnnouncement, 4: Status, 5: UpdateBundle, 6: DuplicateVoteEvidence,
    7: MembershipTx,
}
_GOSSIP_TAGS = {cls: tag for tag, cls in GOSSIP_TYPES.items()}
GOSSIP_MAX_SIZE = Proposal.MAX_SIZE + 16


def encode_gossip(msg: Message) -> bytes:
    return pack([_GOSSIP_TAGS[type(msg)], msg.to_list()])


def decode_gossip(data: bytes) -> Message:
    value = unpack(data, max_size=GOSSIP_MAX_SIZE)
    tag, body = expect_list(value, 2, "gossip envelope")
    cls = GOSSIP_TYPES.get(tag) if isinstance(tag, int) and not isinstance(tag, bool) else None
    if cls is None:
        raise DecodeError(f"gossip: unknown message tag {tag!r}")
    return cls.from_list(body)
