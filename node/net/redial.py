"""(p12) libp2p's bootstrap gives up after 3 failures: this loop keeps dialling the known peers, with back-off."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Protocol

import trio

log = logging.getLogger("flnode.net")


class Dialer(Protocol):
    peer_id: str

    def connected_peers(self) -> list[str]: ...

    async def connect(self, addr: str, timeout: float = 5.0) -> bool: ...

    def count(self, name: str, by: int = 1) -> None: ...


async def redial(net: Dialer, bootstrap: Sequence[str], max_peers: int) -> None:
    """Dial every bootstrap address not connected, until `max_peers` are (0: all). Each node prefers its own subset
    (ordered by a hash of both ids), so the graph is a random one of about twice that degree."""
    backoff: dict[str, float] = {}
    next_try: dict[str, float] = {}
    mine = net.peer_id.encode()
    order = sorted(bootstrap, key=lambda a: hashlib.blake2b(mine + a.encode(), digest_size=8).digest())
    while True:
        connected = set(net.connected_peers())
        now = trio.current_time()
        for addr in order:
            pid = addr.rsplit("/p2p/", 1)[-1]
            if pid in connected or next_try.get(addr, 0) > now:
                continue
            if max_peers and len(connected) >= max_peers:
                break
            connected.add(pid)  # counted as soon as tried: one pass dials at most up to the limit
            if await net.connect(addr):
                backoff.pop(addr, None)
                log.info("connected", extra={"peer": pid[:16]})
                net.count("dials_ok")
            else:
                if addr not in backoff:
                    log.warning("cannot reach bootstrap peer; retrying with back-off", extra={"addr": addr})
                b = min(10.0, backoff.get(addr, 0.25) * 2)
                backoff[addr] = b
                next_try[addr] = trio.current_time() + b
                net.count("dials_failed")
        await trio.sleep(0.5)
