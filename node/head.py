"""The committed tip of the chain, the validator set per height, and the wake-ups services wait on.

`Head` is written only by the committer (`advance`); every other service reads it and waits on it with
`wait_for(height)`. What changes between commits (an update or a blob arriving) wakes `arrivals`, a separate
signal, so a commit does not wake those who wait for data and data does not wake those who wait for a commit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio
from flnode.consensus import ValidatorSet
from flnode.node.app import AppState, genesis_state, validator_powers
from flnode.node.app.powers import SLASH_DELAY, carries_priorities, proposer_sets, set_at
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest
from flnode.protocol.messages import CommitCertificate

if TYPE_CHECKING:
    from flnode.node.chain.store import ChainStore

SET_CACHE = 16  # distinct validator sets kept (a set change is rare; a cache miss costs a recomputation)


class Signal:
    """Wakes every task waiting at the moment of `set()`; later waiters wait for the next one."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Head:
    """The committed tip: state, block hash, certificate."""

    def __init__(self, genesis: Genesis, state: AppState, last_block_hash: bytes,
                 last_cert: CommitCertificate | None) -> None:
        self.genesis = genesis
        self.state = state
        self.last_block_hash = last_block_hash
        self.last_cert = last_cert
        self._moved = Signal()
        self._sets: dict[Any, ValidatorSet] = {}
        self._set_at: dict[int, tuple[AppState, ValidatorSet]] = {}

    @classmethod
    def at_tip(cls, genesis: Genesis, store: ChainStore) -> Head:
        """The head at the store's latest height (genesis when it holds none)."""
        height = store.latest_height()
        if height == 0:
            return cls(genesis, genesis_state(genesis), digest(genesis.canonical_bytes()), None)
        block = store.get_block(height)
        assert block is not None
        return cls(genesis, store.get_state(height), block.hash(), store.get_certificate(height))

    @property
    def height(self) -> int:
        return self.state.height

    @property
    def next_height(self) -> int:
        return self.state.height + 1

    def advance(self, state: AppState, block_hash: bytes, cert: CommitCertificate) -> None:
        """The committer stored `state`'s height: it is the tip now."""
        if state.height != self.state.height + 1:
            raise ValueError(f"tip {self.state.height} cannot advance to height {state.height}")
        self.state, self.last_block_hash, self.last_cert = state, block_hash, cert
        self._set_at.clear()  # its entries hold the old state (and so its model) alive
        self._moved.set()

    async def wait_for(self, height: int) -> None:
        """Return once the tip is at `height` or past it."""
        while self.state.height < height:
            await self._moved.wait()

    def validator_set(self, height: int) -> ValidatorSet | None:
        """The set in force at `height`, known up to SLASH_DELAY heights past the tip (slashing is delayed)."""
        state = self.state
        if height > state.height + SLASH_DELAY or height < max(1, state.height):
            return None  # older heights are never asked for by the live path
        cached = self._set_at.get(height)
        if cached is not None and cached[0] is state:
            return cached[1]  # asked for every message: computed once per (state, height)
        priorities = carries_priorities(self.genesis)
        if priorities:  # open membership: the stored set with its priorities
            key: Any = [e for e in proposer_sets(self.genesis, state) if e[0] <= height][-1]
        else:
            key = tuple(sorted(validator_powers(self.genesis, state, height).items()))
        vs = self._sets.get(key)
        if vs is None:
            if len(self._sets) >= SET_CACHE:
                self._sets.clear()
            vs = self._sets[key] = set_at((key,), height) if priorities else ValidatorSet(dict(key))
        if len(self._set_at) > 8:
            self._set_at.clear()
        self._set_at[height] = (state, vs)
        return vs
