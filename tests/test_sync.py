"""BlockSync through its own surface: a node behind asks a peer for certified blocks, checks each against the one
certificate check of chain/verify, hands it to the driver and waits until it is applied; a forged certificate or
a block that does not link is refused and counted; the server answers batches and its tip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import trio
from flnode.consensus import CommitReceived
from flnode.node.app import genesis_state
from flnode.node.chain.store import ChainStore
from flnode.node.chain.verify import genesis_block_hash
from flnode.node.head import Head
from flnode.node.metrics import Metrics
from flnode.node.store_worker import StoreWorker
from flnode.node.sync import BLOCKS_PROTOCOL, STATUS_PROTOCOL, BlockSync
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import Status
from test_chain import make_chain, store_chain


class Net:
    """Requests go straight to the serving BlockSync's handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.server: BlockSync | None = None

    def set_handler(self, proto: str, fn: Any, **_: Any) -> None:
        self.handlers[proto] = fn

    def connected_peers(self) -> list[str]:
        return ["server"]

    async def request(self, peer: str, proto: str, data: bytes, **_: Any) -> bytes:
        assert self.server is not None
        return await self.server.net.handlers[proto](peer, data)  # type: ignore[attr-defined, no-any-return]


def serving(tmp_path: Path, heights: int) -> tuple[Genesis, list[Any], BlockSync, StoreWorker]:
    g, blocks, blobs = make_chain(heights)
    db = tmp_path / "server.sqlite"
    store_chain(db, g, blocks, blobs)
    store = ChainStore.open(db, genesis_hash=g.hash())
    net = Net()
    worker = StoreWorker(store)
    last = blocks[-1]
    server = BlockSync(Head(g, last[2], last[0].hash(), None), net, store, worker, Metrics(), None)  # type: ignore[arg-type]
    server.register()
    return g, blocks, server, worker


async def test_a_node_behind_syncs_every_block_and_refuses_a_forged_one(tmp_path: Path) -> None:
    g, blocks, server, worker = serving(tmp_path, 4)
    status = Status.decode(await server.serve_status("me", b""))
    assert status.height == 4 and status.block_hash == blocks[-1][0].hash()
    assert set(server.net.handlers) == {BLOCKS_PROTOCOL, STATUS_PROTOCOL}  # type: ignore[attr-defined]

    tip = Head(g, genesis_state(g), genesis_block_hash(g), None)
    by_height = {b.height: (b, s) for b, _, s, _ in blocks}
    delivered: list[int] = []

    async def apply(ev: CommitReceived) -> None:  # the driver's commit path, in one line
        delivered.append(ev.block.height)
        tip.advance(by_height[ev.block.height][1], ev.block.hash(), ev.certificate)

    net = Net()
    net.server = server
    client = BlockSync(tip, net, server.store, worker, Metrics(), apply)  # type: ignore[arg-type]
    client.saw_height(5, "server")  # a message of height 5: its sender committed 4
    assert client.ahead_seen and client.ahead_of_us == (4, "server")
    with trio.fail_after(10):
        await client.sync_from("server", 4)
    assert delivered == [1, 2, 3, 4] and tip.state.height == 4

    # the same chain again, with height 2's certificate signed for height 1's block: refused at height 2
    forged = Head(g, by_height[1][1], blocks[0][0].hash(), None)
    bad_cert = replace(blocks[1][1], block_hash=blocks[0][0].hash())
    real_read = server._read_blocks

    def tampered(start: int, count: int) -> bytes:
        from flnode.protocol.messages import BlockResponse

        raw = BlockResponse.decode(real_read(start, count))
        entries = tuple((b, bad_cert if b.height == 2 else c) for b, c in raw.entries)
        return BlockResponse(entries).encode()

    server._read_blocks = tampered  # type: ignore[method-assign]
    refusing = BlockSync(forged, net, server.store, worker, Metrics(), apply)  # type: ignore[arg-type]
    delivered.clear()
    with trio.fail_after(10):
        await refusing.sync_from("server", 4)
    assert delivered == [] and refusing.metrics.counters["rejected_bad_sync_block"] == 1


async def test_a_message_past_the_gate_starts_a_sync_without_the_one_behind_grace(tmp_path: Path,
                                                                                  monkeypatch: Any) -> None:
    """A validator two heights behind hears only messages its gate refuses as too far ahead: such a message makes it
    sync at once (believing only that the sender committed our next height and one more), not after the
    one-commit-behind grace nor the stall poll."""
    import flnode.node.sync as sync_mod

    monkeypatch.setattr(sync_mod, "AHEAD_GRACE_S", 60.0)  # were it applied here, the sync would not finish in time
    monkeypatch.setattr(sync_mod, "STALL_POLL_S", 60.0)
    g, blocks, server, worker = serving(tmp_path, 4)
    tip = Head(g, genesis_state(g), genesis_block_hash(g), None)
    by_height = {b.height: (b, s) for b, _, s, _ in blocks}
    delivered: list[int] = []

    async def apply(ev: CommitReceived) -> None:
        delivered.append(ev.block.height)
        tip.advance(by_height[ev.block.height][1], ev.block.hash(), ev.certificate)

    net = Net()
    net.server = server
    client = BlockSync(tip, net, server.store, worker, Metrics(), apply)  # type: ignore[arg-type]
    client.committed()  # a commit just now: no stall poll for a minute
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        await trio.sleep(0.3)
        assert delivered == []  # nothing shows the network ahead: no request
        client.peer_ahead("server")
        assert client.ahead_of_us == (2, "server")  # our tip is 0: the sender committed at least 2
        with trio.fail_after(10):
            await tip.wait_for(4)  # one batch brings every block the peer has
        nursery.cancel_scope.cancel()
    assert delivered == [1, 2, 3, 4]


async def test_every_block_a_sync_delivers_counts_as_committed_elsewhere(tmp_path: Path) -> None:
    """A batch runs past the height that started the sync: each certified block in it is known committed elsewhere
    when the driver gets it, so the commit path fetches its blobs at once instead of waiting for bundles no peer
    sends any more (a syncing validator took 0.5 s a block and never caught up with a 0.2 s/height network)."""
    g, blocks, server, worker = serving(tmp_path, 4)
    tip = Head(g, genesis_state(g), genesis_block_hash(g), None)
    by_height = {b.height: (b, s) for b, _, s, _ in blocks}
    elsewhere: list[bool] = []
    client: BlockSync | None = None

    async def apply(ev: CommitReceived) -> None:
        assert client is not None
        elsewhere.append(client.committed_elsewhere(ev.block.height))
        tip.advance(by_height[ev.block.height][1], ev.block.hash(), ev.certificate)

    net = Net()
    net.server = server
    client = BlockSync(tip, net, server.store, worker, Metrics(), apply)  # type: ignore[arg-type]
    client.peer_ahead("server")  # believed: the sender committed height 2
    assert not client.committed_elsewhere(3)
    with trio.fail_after(10):
        await client.sync_from("server", client.ahead_of_us[0])
    assert tip.state.height == 4 and elsewhere == [True, True, True, True]
