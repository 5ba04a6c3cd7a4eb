"""The last-sign guard (CometBFT's priv_validator_state.json): the signer itself refuses a conflicting signature.

The consensus records in chain.sqlite already keep a restarted node from re-signing differently, but they go when
the chain store is deleted to resync. This file lives next to the node key, outside the data directory, and
records the highest (height, round, step) signed with the hash of its sign bytes, durably before the signature is
returned. Lower than that is refused, equal is allowed only for the same bytes (a re-sign of the same message).

Steps: proposal 1, prevote 2, precommit 3. Wire it into Tendermint with `guarded(sign, LastSignGuard(path))`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flnode.consensus.machine import SignRefused
from flnode.protocol.encoding import unpack
from flnode.protocol.messages import Proposal, Vote, VoteType

Signer = Callable[[str, bytes], bytes]

STEP_PROPOSAL, STEP_PREVOTE, STEP_PRECOMMIT = 1, 2, 3
_VOTE_STEP = {int(VoteType.PREVOTE): STEP_PREVOTE, int(VoteType.PRECOMMIT): STEP_PRECOMMIT}


class DoubleSignRefused(SignRefused):
    """Signing this would conflict with a signature already made (the machine then stays silent for that step)."""


class SignGuardError(Exception):
    """The guard file exists but cannot be read: refuse to start rather than forget the last signature."""


@dataclass(frozen=True)
class LastSigned:
    height: int
    round: int
    step: int
    payload_hash: bytes

    def position(self) -> tuple[int, int, int]:
        return (self.height, self.round, self.step)


class LastSignGuard:
    """The last signature's (height, round, step, sign-bytes hash) in a small JSON file at `path`."""

    def __init__(self, path: Path, *, deferred: bool = False) -> None:
        """deferred: check_and_record only updates memory, and flush() (on the store thread, before the signed
        message is sent) makes it durable; a signature is never sent before its position is on disk either way,
        but the event loop no longer waits for two fsyncs per signature."""
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._lock = threading.Lock()
        self.last = self._load()
        self.deferred = deferred
        self._unwritten: LastSigned | None = None

    def _load(self) -> LastSigned | None:
        # a leftover .tmp (crash before the rename) is ignored: the rename is the commit point
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            d = json.loads(raw)
            last = LastSigned(int(d["height"]), int(d["round"]), int(d["step"]), bytes.fromhex(d["payload_hash"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SignGuardError(f"sign guard {self.path} is unreadable ({exc}); refusing to sign") from None
        if min(last.height, last.round, last.step) < 0:
            raise SignGuardError(f"sign guard {self.path} holds a negative position")
        return last

    def check_and_record(self, height: int, round: int, step: int, payload_hash: bytes) -> None:
        """Allow a signature at (height, round, step) over bytes hashing to `payload_hash`, or raise
        DoubleSignRefused. A new highest position is on disk (fsync'd) before this returns."""
        with self._lock:
            pos = (height, round, step)
            last = self.last
            if last is not None:
                if pos < last.position():
                    raise DoubleSignRefused(f"refusing to sign {pos}: already signed {last.position()}")
                if pos == last.position():
                    if payload_hash != last.payload_hash:
                        raise DoubleSignRefused(f"refusing to sign {pos} again over different bytes")
                    return
            new = LastSigned(height, round, step, payload_hash)
            if self.deferred:
                self._unwritten = new
            else:
                self._write(new)
            self.last = new

    def flush(self) -> None:
        """Write the highest position recorded since the last flush (deferred mode; safe from any thread)."""
        with self._lock:
            if self._unwritten is not None:
                self._write(self._unwritten)
                self._unwritten = None

    def _write(self, last: LastSigned) -> None:
        body = json.dumps({"height": last.height, "round": last.round, "step": last.step,
                           "payload_hash": last.payload_hash.hex()}).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def sign_position(kind: str, payload: bytes) -> tuple[int, int, int] | None:
    """(height, round, step) of a consensus sign payload; None for other kinds (not guarded)."""
    if kind == Vote.KIND:
        t, height, round, _block_hash, _validator = unpack(payload)
        return height, round, _VOTE_STEP[t]
    if kind == Proposal.KIND:
        height, round, _pol_round, _block_hash, _proposer = unpack(payload)
        return height, round, STEP_PROPOSAL
    return None


def guarded(sign: Signer, guard: LastSignGuard) -> Signer:
    """`sign` behind the guard: proposals and votes are checked and recorded first, other kinds pass through."""

    def guarded_sign(kind: str, payload: bytes) -> bytes:
        pos = sign_position(kind, payload)
        if pos is not None:
            guard.check_and_record(*pos, hashlib.sha256(payload).digest())
        return sign(kind, payload)

    return guarded_sign


__all__ = ["DoubleSignRefused", "LastSignGuard", "LastSigned", "SignGuardError", "guarded", "sign_position"]
