"""kill -9 at random moments, restart, repeat: no validator ever signs two different votes for one
(height, round, type), nothing committed is lost, and every node ends with the same model.

An observer peer records every vote gossiped on the network while two of four validators are killed and restarted
over and over.
"""

from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from flnode.cli.demo import NodeView, free_ports, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet
from flnode.node.net import ConsensusTransport, P2PNode, peer_id_of
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import Vote, decode_gossip
from netutil import heights, model_hashes_at

pytestmark = pytest.mark.slow


_heights = heights


async def test_kill9_restarts_never_double_sign(tmp_path: Path) -> None:
    n = 4
    ports = free_ports(n)
    create_testnet(
        tmp_path, n, chain_id="crash-test", host="127.0.0.1", listen_host="127.0.0.1", ports=ports,
        task_rules=_task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 800), force=True,
    )
    genesis = Genesis.load(tmp_path / "node0" / "genesis.json")
    views = [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(n)]
    procs: list[subprocess.Popen[bytes]] = [start_node(v.home) for v in views]
    votes: dict[tuple[bytes, int, int, int], set[bytes | None]] = {}
    seen = 0
    rng = random.Random(1234)
    committed_before_kill: dict[int, int] = {}
    try:
        boot = [f"/ip4/127.0.0.1/tcp/{p}/p2p/{a.rsplit('/p2p/', 1)[1]}"
                for p, a in zip(ports, [_addr(v.home) for v in views], strict=True)]
        # Consensus travels over direct validator streams: the observer subscribes to every validator's stream
        # (it used to listen on gossip, where it heard nothing once the mesh stopped carrying it votes).
        observer = P2PNode(NodeKey.generate().seed, ["/ip4/127.0.0.1/tcp/0"], bootstrap=boot)
        listener = ConsensusTransport(observer, [peer_id_of(v.key_bytes) for v in genesis.validators], dial_all=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(observer.run)
            await nursery.start(listener.run)

            async def record() -> None:
                nonlocal seen
                async for _, data in listener.inbound:
                    msg = decode_gossip(data)
                    if isinstance(msg, Vote):
                        seen += 1
                        key = (msg.validator, msg.height, msg.round, int(msg.type))
                        votes.setdefault(key, set()).add(msg.block_hash)

            nursery.start_soon(record)
            with trio.fail_after(60):
                while min(_heights(views)) < 2:
                    await trio.sleep(0.2)
            with trio.fail_after(60):  # the observer must be in the gossip mesh before the kills start
                while seen < 5:
                    await trio.sleep(0.1)
            for _ in range(8):
                victim = rng.choice([1, 2])
                await trio.sleep(rng.uniform(0.05, 0.9))
                committed_before_kill[victim] = _heights(views)[victim]
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait(10)
                await trio.sleep(rng.uniform(0.0, 0.5))
                procs[victim] = start_node(views[victim].home)
            target = max(_heights(views)) + 2
            with trio.fail_after(120):
                while min(_heights(views)) < target:
                    assert all(p.poll() is None for p in procs), "a node died"
                    await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    finally:
        stop_nodes(procs)
    assert seen > 10  # the observer really heard the network (the count depends on how fast heights go)
    double = {k: v for k, v in votes.items() if len(v) > 1}
    assert not double, f"double-signed votes: {double}"
    for i, h in committed_before_kill.items():
        assert _heights(views)[i] >= h  # nothing committed was lost
    assert len(model_hashes_at(views, min(_heights(views)))) == 1


def _addr(home: Path) -> str:
    return "/p2p/" + peer_id_of(NodeKey.load(home / "node_key.json").public_key)
