"""A committed block is final, and applying it must never stop the node: a missing blob is fetched with back-off
while the consensus driver keeps taking events; a committed block that cannot be executed halts consensus with
a clear status instead of crashing (and crash-looping after every restart)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import trio
from flnode.consensus import CommitReceived, TimeoutFired, TimeoutKind
from flnode.node.chain.store import ChainStore
from flnode.node.config import home_paths, load_config
from flnode.node.daemon import Daemon
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import Block, CommitCertificate, Vote, VoteType
from test_node_admission import _proposal, _updates
from test_node_admission import net as net  # noqa: F401 - the shared testnet fixture


def _certify(genesis: Genesis, keys: list[NodeKey], block: Block) -> CommitCertificate:
    sigs = []
    for k in keys[:3]:
        v = Vote(VoteType.PRECOMMIT, block.height, 0, block.hash(), k.public_key).signed(k, genesis.chain_id)
        sigs.append((k.public_key, v.signature))
    return CommitCertificate(block.height, 0, block.hash(), tuple(sorted(sigs)))


def _daemon(d: Path, genesis: Genesis, tmp: Path) -> Daemon:
    home = d / "node3"
    cfg = load_config(home, {}, {}).config
    cfg = replace(cfg, participate=False)
    key = NodeKey.load(home_paths(home, cfg).node_key)
    store = ChainStore.open(tmp / "chain.sqlite", genesis_hash=genesis.hash())
    return Daemon(genesis, key, cfg, store, status_path=tmp / "status.json")


async def _run_driver(daemon: Daemon, nursery: trio.Nursery) -> None:
    # no network here: the start-up gate is tested with real peers elsewhere
    daemon.tasks.nursery = nursery  # where the driver's one-shot tasks (fetch, validate) are supervised
    await nursery.start(daemon.driver.run)


async def test_missing_blob_of_a_committed_block_does_not_stop_the_driver(
    net: tuple[Path, Genesis, list[NodeKey]], tmp_path: Path  # noqa: F811
) -> None:
    d, genesis, keys = net
    ups = _updates(genesis, keys)
    block = _proposal(genesis, keys, ups).block
    daemon = _daemon(d, genesis, tmp_path)
    async with trio.open_nursery() as n:
        await _run_driver(daemon, n)
        await daemon.driver.inbox.send(CommitReceived(block, _certify(genesis, keys, block)))
        # No peer has the blobs. The driver must keep taking events: far more than the queue holds.
        with trio.fail_after(10):
            for _ in range(3000):
                await daemon.driver.inbox.send(TimeoutFired(TimeoutKind.PREVOTE, 1, 0))
            while daemon.driver.events.statistics().current_buffer_used:  # and really consumed them
                await trio.sleep(0.01)
        assert daemon.state.height == 0 and daemon.driver.applying == 1
        with trio.fail_after(10):
            while daemon.metrics.counters["blob_fetch_retries"] < 2:  # and it keeps trying
                await trio.sleep(0.05)
        # The blobs turn up (from anyone): the commit completes and the next height starts.
        for ann, blob in ups:
            await daemon.blobs.put(ann.blob_hash, blob)
        with trio.fail_after(30):
            while daemon.state.height < 1 or getattr(daemon.machine, "height", 0) < 2:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert daemon.store.latest_height() == 1
    daemon.store.close()


async def test_committed_block_that_cannot_be_executed_halts_without_crashing(
    net: tuple[Path, Genesis, list[NodeKey]], tmp_path: Path  # noqa: F811
) -> None:
    d, genesis, keys = net
    good = _proposal(genesis, keys, []).block
    bad = replace(good, header=replace(good.header, model_hash=b"\x42" * 32))  # 2/3+ signed a result we disagree with
    daemon = _daemon(d, genesis, tmp_path)
    async with trio.open_nursery() as n:
        await _run_driver(daemon, n)
        await daemon.driver.inbox.send(CommitReceived(bad, _certify(genesis, keys, bad)))
        with trio.fail_after(10):
            while daemon.halted is None:
                await trio.sleep(0.05)
            for _ in range(2000):  # still alive and taking events
                await daemon.driver.inbox.send(TimeoutFired(TimeoutKind.PREVOTE, 1, 0))
        n.cancel_scope.cancel()
    status = json.loads((tmp_path / "status.json").read_text())
    assert "cannot execute committed block 1" in status["halted"]
    assert daemon.metrics.counters["commit_failures"] >= 1
    assert daemon.store.latest_height() == 0  # nothing wrong was stored
    daemon.store.close()


async def test_a_block_whose_blobs_are_missing_is_not_judged_invalid(
    net: tuple[Path, Genesis, list[NodeKey]], tmp_path: Path  # noqa: F811
) -> None:
    """valid / invalid / not yet: missing data gives no answer (never a cached 'invalid'); the answer comes when
    the data lands."""
    from flnode.consensus import ValueValidated

    d, genesis, keys = net
    ups = _updates(genesis, keys)
    block = _proposal(genesis, keys, ups).block
    daemon = _daemon(d, genesis, tmp_path)
    answers: list[ValueValidated] = []

    async def listen() -> None:
        async for ev in daemon.driver.events:
            if isinstance(ev, ValueValidated):
                answers.append(ev)

    async with trio.open_nursery() as n:
        daemon.tasks.nursery = n
        n.start_soon(listen)
        n.start_soon(daemon.checker.validate, 1, 0, block)
        await trio.sleep(1.5)  # several fetch attempts fail: no holder is reachable
        assert answers == [] and daemon.metrics.counters["blob_fetch_retries"] >= 1
        for ann, blob in ups:
            await daemon.blobs.put(ann.blob_hash, blob)
        with trio.fail_after(15):
            while not answers:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert answers == [ValueValidated(1, 0, block.hash(), True)]
    daemon.store.close()
