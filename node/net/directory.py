"""The direct-link side of the consensus transport: our listener, the directory of where each peer's direct link
listens (learned from libp2p neighbours, `/flnode/direct/1.0.0`), and the dials for a consensus session or for one
request. The links themselves (handshake, encryption) are node/net/direct.py."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio
from flnode.protocol.crypto import NodeKey
from flnode.protocol.encoding import pack, unpack
from flnode.protocol.errors import ProtocolError

from .direct import REQUEST_MAGIC, DirectListener, DirectStream, ExactReader, dial
from .frames import NetError
from .host import P2PNode

log = logging.getLogger("flnode.net.consensus")

DIRECT_PROTOCOL = "/flnode/direct/1.0.0"  # libp2p request: "which TCP port is your direct listener on?"
DIRECTORY_MAX = 1024  # entries in one directory answer
MAX_DIRECTORY_ANSWER = 128 << 10


class Directory:
    """Where each peer's direct link listens. A peer's own answer (its port, at the address our libp2p connection
    reaches it on) is first-hand; entries relayed by others only fill gaps. A wrong entry costs one failed
    handshake (the link authenticates the identity), after which it is forgotten. Sans-I/O."""

    def __init__(self) -> None:
        self._addrs: dict[str, tuple[str, int]] = {}
        self._configured: dict[str, tuple[str, int]] = {}
        self._firsthand: set[str] = set()

    def __len__(self) -> int:
        return len(self._addrs)

    def get(self, peer: str) -> tuple[str, int] | None:
        return self._addrs.get(peer) or self._configured.get(peer)

    def configure(self, entries: list[tuple[str, str, int]], me: str) -> None:
        """Addresses from the node's config (direct_peers): used until a learned one replaces them, and never
        forgotten (a peer not yet listening at start-up is dialled there again)."""
        self._configured = {p: (h, port) for p, h, port in entries if p != me}

    def learn_firsthand(self, peer: str, host: str, port: int) -> None:
        self._addrs[peer] = (host, port)
        self._firsthand.add(peer)

    def learn_relayed(self, entries: list[tuple[str, str, int]], me: str) -> int:
        new = 0
        for peer, host, port in entries:
            if peer != me and peer not in self._firsthand and peer not in self._addrs:
                self._addrs[peer] = (host, port)
                new += 1
        return new

    def forget(self, peer: str) -> None:
        self._addrs.pop(peer, None)
        self._firsthand.discard(peer)

    def answer(self, own_port: int) -> bytes:
        """Our port, and what we know of others' (loopback entries only make sense to peers on this host too)."""
        known = [[p, h, pt] for p, (h, pt) in sorted(self._addrs.items())][:DIRECTORY_MAX]
        return pack([own_port, known])

    @staticmethod
    def parse(raw: bytes) -> tuple[int, list[tuple[str, str, int]]]:
        """(their port, relayed entries); malformed entries are skipped, a malformed answer is an error."""
        try:
            value = unpack(raw, MAX_DIRECTORY_ANSWER)
        except ProtocolError:
            raise NetError("a malformed directory answer") from None
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int)
                and isinstance(value[1], list) and 0 <= value[0] <= 65535):
            raise NetError("a malformed directory answer")
        entries = [
            (e[0], e[1], e[2]) for e in value[1][:DIRECTORY_MAX]
            if isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], str)
            and isinstance(e[2], int) and 0 < len(e[0]) <= 64 and 0 < len(e[1]) <= 64 and 0 < e[2] <= 65535
        ]
        return value[0], entries


@dataclass(frozen=True)
class DirectConfig:
    """Consensus frames over our own encrypted TCP link (node/net/direct.py) when both sides have one."""

    key: NodeKey
    chain_id: str
    host: str  # listen address of the direct link
    port: int = 0  # 0: any free port (peers learn it over libp2p)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class DirectLinks:
    """Direct links for a transport: `accept(peer, stream)` gets each authenticated inbound link; `counters` are
    the transport's."""

    def __init__(self, p2p: P2PNode, config: DirectConfig, accept: Callable[[str, DirectStream], Awaitable[None]],
                 counters: dict[str, int], open_timeout: float) -> None:
        self.p2p, self.config, self.counters, self.open_timeout = p2p, config, counters, open_timeout
        self.listener: DirectListener | None = DirectListener(
            config.key, config.chain_id, accept, config.host, config.port, counters,
            request_handler=p2p.serve_direct_request)
        self.directory = Directory()
        self._asked: dict[str, float] = {}  # libp2p peer -> when we last asked it for its directory
        p2p.set_handler(DIRECT_PROTOCOL, self._serve_directory, max_request=16)
        p2p.requests.open_direct = self.open_request

    async def start(self, nursery: trio.Nursery, peers: Callable[[], Iterable[str]]) -> None:
        """Listen, and keep learning the addresses of `peers()`; without a listener consensus runs over libp2p."""
        assert self.listener is not None
        try:
            await nursery.start(self.listener.run)
        except OSError as exc:
            log.warning("no direct link listener", extra={"error": str(exc)[:200]})
            self.listener = None
            return
        nursery.start_soon(self._directory_loop, peers)

    async def open_request(self, peer: str) -> ExactReader | None:
        """A direct connection for one request to `peer`, or None (no direct address known, or the dial failed:
        libp2p carries it)."""
        addr = self.directory.get(peer)
        if addr is None:
            return None
        try:
            stream = await dial(addr[0], addr[1], self.config.key, self.config.chain_id, peer,
                                timeout=self.open_timeout, magic=REQUEST_MAGIC)
        except NetError as exc:
            self.counters["direct_request_dial_failed"] += 1
            log.debug("direct request dial failed", extra={"peer": peer[:16], "error": str(exc)[:200]})
            return None
        return ExactReader(stream)

    async def dial_session(self, peer: str) -> DirectStream | None:
        """A direct link to `peer` if both sides have one; None means: use a libp2p stream."""
        if self.listener is None:
            return None
        if self.directory.get(peer) is None and peer in self.p2p.connected_peers():
            await self._ask_directory(peer)
        addr = self.directory.get(peer)
        if addr is None:
            self.counters["direct_no_host"] += 1
            return None
        try:
            return await dial(addr[0], addr[1], self.config.key, self.config.chain_id, peer,
                              timeout=self.open_timeout)
        except NetError as exc:
            self.counters["direct_dial_failed"] += 1
            self.directory.forget(peer)  # ask again: it may have restarted on another port
            log.debug("direct dial failed", extra={"peer": peer[:16], "error": str(exc)[:200]})
            return None

    async def _serve_directory(self, peer: str, request: bytes) -> bytes:
        return self.directory.answer(self.listener.port if self.listener is not None else 0)

    async def _ask_directory(self, peer: str) -> None:
        """Ask a libp2p-connected peer for its direct port and what it knows of others'."""
        self._asked[peer] = trio.current_time()
        try:
            raw = await self.p2p.request(peer, DIRECT_PROTOCOL, b"", max_response=MAX_DIRECTORY_ANSWER,
                                         timeout=self.open_timeout)
            port, relayed = Directory.parse(raw)
        except NetError as exc:  # not up yet, or a peer without the protocol: ask again later
            self.counters["direct_no_port"] += 1
            log.debug("no directory answer", extra={"peer": peer[:16], "error": str(exc)[:200]})
            return
        host = self.p2p.remote_host(peer)
        if port and host is not None:
            self.directory.learn_firsthand(peer, host, port)
        if host is not None and not _loopback(host):  # its loopback entries mean its own machine, not ours
            relayed = [e for e in relayed if not _loopback(e[1])]
        self.directory.learn_relayed(relayed, self.p2p.peer_id)

    async def _directory_loop(self, peers: Callable[[], Iterable[str]]) -> None:
        """Learn direct addresses from libp2p neighbours, so validators need not all be libp2p-connected: each
        neighbour is asked at once, then again while some validator's address is still unknown (after 1 s, 2 s,
        4 s, ... up to 30 s between asks)."""
        interval: dict[str, float] = {}
        while True:
            now = trio.current_time()
            missing = any(self.directory.get(p) is None for p in peers())
            for peer in self.p2p.connected_peers():
                last = self._asked.get(peer)
                if last is None or (missing and now - last >= interval.get(peer, 1.0)):
                    if last is not None:
                        interval[peer] = min(30.0, interval.get(peer, 1.0) * 2)
                    await self._ask_directory(peer)
            await trio.sleep(0.5)
