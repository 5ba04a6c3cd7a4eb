"""The application state after each height, and its hash (the app hash in every block header)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flnode.protocol.encoding import expect_bytes, expect_int, expect_list, pack, unpack
from flnode.protocol.errors import DecodeError, GenesisError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import ZERO_HASH, digest
from flnode.protocol.tensors import tensors_hash

from .membership import Membership
from .tasks import initial_model

Tensors = dict[str, np.ndarray]
# A validator set from its first height: (first height, ((key, power, proposer priority at that height), ...)).
ProposerSet = tuple[int, tuple[tuple[bytes, int, int], ...]]
STATE_BASE_BYTES = 1 << 22  # the decode cap without members...
MEMBER_STATE_BYTES = 1 << 10  # ...plus this per member seat (record, balance, reputation, ballots, txs seen)


@dataclass(frozen=True)
class AppState:
    height: int
    model: Tensors = field(compare=False, repr=False)
    model_hash: bytes
    balances: dict[bytes, int]
    reputation: dict[bytes, int]
    last_receipt_hash: bytes = ZERO_HASH
    # (validator, height, round, vote type) of equivocations already punished: evidence counts once.
    punished: frozenset[tuple[bytes, int, int, int]] = frozenset()
    # Proven equivocators: validator -> first height at which its voting power is zero.
    slashed: dict[bytes, int] = field(default_factory=dict)
    # Differential privacy: rounds charged per participant (node/app/privacy.py); empty while DP is off.
    dp_rounds: dict[bytes, int] = field(default_factory=dict)
    # Open membership (node/app/membership.py); empty under the genesis admission policy.
    membership: Membership = field(default_factory=Membership)
    # Open membership: the validator sets of heights height .. height + 2 with their proposer priorities, so a
    # set change costs no replay of the chain's history (node/app/powers.py); empty under a fixed set.
    proposers: tuple[ProposerSet, ...] = ()
    # centered_clip_momentum: the model before this one (its hash committed here, its tensors from its blob), so
    # the next round clips around the last aggregate step; None under every other rule.
    prev_model_hash: bytes | None = None
    prev_model: Tensors = field(default_factory=dict, compare=False, repr=False)

    def _canonical(self) -> list[object]:
        # The slashed map is appended only when non-empty: states without slashing keep their old bytes and hash.
        tail: list[object] = [[[k, self.slashed[k]] for k in sorted(self.slashed)]] if self.slashed or self.dp_rounds else []
        if self.dp_rounds:  # likewise appended only when non-empty (then after the slashed map, even if empty)
            tail.append([[k, self.dp_rounds[k]] for k in sorted(self.dp_rounds)])
        if not self.membership.empty():  # likewise, after both maps above (each then encoded even if empty)
            tail = [[[k, self.slashed[k]] for k in sorted(self.slashed)],
                    [[k, self.dp_rounds[k]] for k in sorted(self.dp_rounds)], self.membership.canonical()]
        if self.proposers or self.prev_model_hash is not None:  # likewise, after the three above
            tail = [[[k, self.slashed[k]] for k in sorted(self.slashed)],
                    [[k, self.dp_rounds[k]] for k in sorted(self.dp_rounds)], self.membership.canonical(),
                    [[first, [list(r) for r in rows]] for first, rows in self.proposers]]
        if self.prev_model_hash is not None:  # likewise, last (the proposer sets then encoded even if empty)
            tail.append(self.prev_model_hash)
        return [
            self.height,
            self.model_hash,
            [[k, self.balances[k]] for k in sorted(self.balances)],
            [[k, self.reputation[k]] for k in sorted(self.reputation)],
            self.last_receipt_hash,
            [list(p) for p in sorted(self.punished)],
            *tail,
        ]

    def hash(self) -> bytes:
        return digest(pack(["flnode/app-state/v1", *self._canonical()]))

    def excluded(self, author: bytes, threshold: int) -> bool:
        return self.reputation.get(author, 0) < threshold


def genesis_state(genesis: Genesis) -> AppState:
    model = initial_model(genesis.task)
    mh = tensors_hash(model)
    if mh.hex() != genesis.initial_model_hash:
        raise GenesisError(
            f"genesis: initial_model_hash {genesis.initial_model_hash[:12]}… does not match the task's initial model "
            f"{mh.hex()[:12]}…"
        )
    rep = genesis.rules.rewards.initial_reputation
    return AppState(0, model, mh, {k: 0 for k in genesis.participant_keys}, {k: rep for k in genesis.participant_keys})


def encode_state(state: AppState) -> bytes:
    return pack(state._canonical())


def state_size_cap(genesis: Genesis) -> int:
    """The most bytes an encoded state of this chain may take: it grows with the member cap, nothing else."""
    return STATE_BASE_BYTES + MEMBER_STATE_BYTES * genesis.rules.max_members


def prev_model_hash_of(data: bytes, max_size: int = STATE_BASE_BYTES) -> bytes | None:
    """The previous model's hash an encoded state names (centered_clip_momentum), without decoding the rest."""
    fields = unpack(data, max_size=max_size)
    return expect_bytes(fields[10], "previous model hash", 32) if isinstance(fields, list) and len(fields) == 11 \
        else None


def decode_state(data: bytes, model: Tensors, max_size: int = STATE_BASE_BYTES,
                 prev_model: Tensors | None = None) -> AppState:
    """`prev_model`: the tensors of the previous model hash the state names, checked against it (None: not
    loaded, as for a light state)."""
    fields = unpack(data, max_size=max_size)
    if not isinstance(fields, list) or len(fields) not in (6, 7, 8, 9, 10, 11):
        raise DecodeError("app state: expected 6 to 11 fields")
    h, mh, bal, rep, lrh, pun = fields[:6]

    def pairs(v: object, what: str) -> dict[bytes, int]:
        if not isinstance(v, list):
            raise DecodeError(f"app state: bad {what}")
        out = {}
        for item in v:
            k, n = expect_list(item, 2, what)
            out[expect_bytes(k, what, 32)] = expect_int(n, what, -(1 << 62), 1 << 62)
        return out

    if not isinstance(pun, list):
        raise DecodeError("app state: bad punished list")
    punished = set()
    for item in pun:
        v, ph, pr, pt = expect_list(item, 4, "punished")
        punished.add((expect_bytes(v, "validator", 32), expect_int(ph, "height"), expect_int(pr, "round"),
                      expect_int(pt, "type", 1, 2)))
    slashed = pairs(fields[6], "slashed") if len(fields) >= 7 else {}
    dp_rounds = pairs(fields[7], "dp rounds") if len(fields) >= 8 else {}
    membership = Membership.from_canonical(fields[8], allow_empty=len(fields) >= 10) if len(fields) >= 9 else Membership()
    proposers = _proposer_sets(fields[9], allow_empty=len(fields) == 11) if len(fields) >= 10 else ()
    prev_hash = expect_bytes(fields[10], "previous model hash", 32) if len(fields) == 11 else None
    if prev_hash is not None and prev_model is not None and tensors_hash(prev_model) != prev_hash:
        raise DecodeError("app state: previous model blob does not match its hash")
    if len(fields) == 8 and not dp_rounds:
        raise DecodeError("app state: an empty dp rounds map is not encoded")
    if len(fields) == 7 and not slashed:
        raise DecodeError("app state: an empty slashed map is not encoded")
    mh = expect_bytes(mh, "model hash", 32)
    if tensors_hash(model) != mh:
        raise DecodeError("app state: model blob does not match the model hash")
    return AppState(expect_int(h, "height"), model, mh, pairs(bal, "balances"), pairs(rep, "reputation"),
                    expect_bytes(lrh, "receipt hash", 32), frozenset(punished), slashed, dp_rounds, membership,
                    proposers, prev_hash, prev_model if prev_hash is not None and prev_model is not None else {})


def _proposer_sets(value: object, allow_empty: bool = False) -> tuple[ProposerSet, ...]:
    if not isinstance(value, list) or not (0 if allow_empty else 1) <= len(value) <= 4:
        raise DecodeError("app state: bad proposer sets")
    out = []
    for item in value:
        first, rows = expect_list(item, 2, "proposer set")
        if not isinstance(rows, list) or not rows:
            raise DecodeError("app state: bad proposer set")
        parsed = []
        for r in rows:
            k, p, pr = expect_list(r, 3, "proposer")
            parsed.append((expect_bytes(k, "validator", 32), expect_int(p, "power", 1, 1 << 40),
                           expect_int(pr, "priority", -(1 << 62), 1 << 62)))
        out.append((expect_int(first, "first height", 1), tuple(parsed)))
    return tuple(out)
