"""A peer that sends garbage, forged, replayed and oversized messages on every topic and protocol.

Four real node processes keep committing while it attacks; none crashes or stalls, and the node it talks to
counts what it rejected.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from flnode.cli.demo import NodeView, free_ports, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet
from flnode.node.app.limits import update_blob_size
from flnode.node.blobs import BLOB_PROTOCOL
from flnode.node.net import CONSENSUS_PROTOCOL, NetError, P2PNode, encode_frames
from flnode.node.sync import BLOCKS_PROTOCOL, STATUS_PROTOCOL
from flnode.protocol.crypto import NodeKey
from flnode.protocol.encoding import pack
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import (
    UpdateAnnouncement,
    Vote,
    VoteType,
    decode_gossip,
    encode_gossip,
)
from flnode.protocol.topics import Topics
from netutil import heights, model_hashes_at

pytestmark = pytest.mark.slow


_heights = heights


async def _wait_heights(views: list[NodeView], target: int, timeout: float, procs: list[subprocess.Popen[bytes]]) -> None:
    with trio.fail_after(timeout):
        while min(_heights(views)) < target:
            assert all(p.poll() is None for p in procs), "a node process died"
            await trio.sleep(0.2)


async def _attack(
    attacker: P2PNode, genesis: Genesis, victim: str, captured: list[bytes], views: list[NodeView]
) -> dict[str, int]:
    topics = Topics.for_chain(genesis.chain_id)
    stranger = NodeKey(attacker._seed)
    member = genesis.validators[1].key_bytes
    sent = {"gossip": 0, "requests": 0}
    size = update_blob_size(genesis)
    z = b"\x11" * 32
    for _ in range(30):
        h = max(_heights(views)) + 1  # current heights, so the stale-height filter does not catch them first
        for topic in (topics.consensus, topics.updates):
            # malformed bytes, wrong-typed but well-formed msgpack, an unknown tag
            for junk in (os.urandom(64), pack([7, [1, 2, 3]]), pack([2, ["x"] * 6]), b"\xc1" * 10):
                await attacker.publish(topic, junk)
                sent["gossip"] += 1
        # forged: claims to be a member, on the right base model and size, signed by a stranger
        base = bytes.fromhex(json.loads((views[0].home / "data" / "status.json").read_text())["model_hash"])
        forged = UpdateAnnouncement(h, base, z, size, 10, 0, 0, member).signed(stranger, genesis.chain_id)
        await attacker.publish(topics.updates, encode_gossip(forged))
        # well signed by a stranger that is not a participant
        outsider = UpdateAnnouncement(h, base, z, size, 10, 0, 0, stranger.public_key).signed(stranger, genesis.chain_id)
        await attacker.publish(topics.updates, encode_gossip(outsider))
        # well signed, but the signer is not a member
        vote = Vote(VoteType.PREVOTE, h, 0, z, stranger.public_key).signed(stranger, genesis.chain_id)
        await attacker.publish(topics.consensus, encode_gossip(vote))
        # a real vote whose signature was cut short, and one for another chain
        bad = Vote(VoteType.PRECOMMIT, h, 0, z, member, b"\x00" * 64)
        await attacker.publish(topics.consensus, encode_gossip(bad))
        other_chain = vote.signed(stranger, "another-chain")
        await attacker.publish(topics.consensus, encode_gossip(replace(other_chain, validator=member)))
        # replays of real traffic seen earlier
        for data in captured[:20]:
            await attacker.publish(topics.consensus, data)
        sent["gossip"] += 5 + min(20, len(captured))
        # the direct consensus stream: a non-validator may listen, but one that talks is cut off
        try:
            stream = await attacker.open_stream(victim, CONSENSUS_PROTOCOL, timeout=2.0)
            await stream.write(encode_frames([b"", os.urandom(80)]))
            with trio.move_on_after(0.5):
                await stream.read(1024)
            await stream.reset()
        except Exception:
            pass
        # request/response protocols: garbage frames, absurd sizes, requests for unknown blobs
        for proto in (BLOB_PROTOCOL, BLOCKS_PROTOCOL, STATUS_PROTOCOL, "/flnode/nonexistent/1"):
            for payload in (os.urandom(40), b"", pack([10**6, 10**6]), b"\xff" * 5000):
                try:
                    await attacker.request(victim, proto, payload, max_response=1 << 20, timeout=2.0)
                except NetError:
                    pass
                sent["requests"] += 1
        # a raw stream that announces a 4 GB frame and then goes quiet
        try:
            from libp2p.custom_types import TProtocol
            from libp2p.peer.id import ID

            with trio.move_on_after(1):
                s = await attacker._host.new_stream(ID.from_base58(victim), [TProtocol(BLOB_PROTOCOL)])
                await s.write(b"\xff\xff\xff\xff" + os.urandom(100))
                await s.reset()
        except Exception:
            pass
        await trio.sleep(0.05)
    return sent


async def test_hostile_peer_does_not_crash_or_stall_anyone(tmp_path: Path) -> None:
    n = 4
    ports = free_ports(n)
    create_testnet(
        tmp_path, n, chain_id="hostile-test", host="127.0.0.1", listen_host="127.0.0.1", ports=ports,
        task_rules=_task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 1500), force=True,
    )
    genesis = Genesis.load(tmp_path / "node0" / "genesis.json")
    views = [NodeView(f"node{i}", tmp_path / f"node{i}") for i in range(n)]
    procs = [start_node(v.home) for v in views]
    try:
        await _wait_heights(views, 2, 90, procs)
        with trio.fail_after(30):  # libp2p starts after the first commit (direct links carry consensus before)
            while not (addrs := json.loads((tmp_path / "node0" / "data" / "status.json").read_text())["addrs"]):
                await trio.sleep(0.2)
        victim_addr = addrs[0]
        victim = victim_addr.rsplit("/p2p/", 1)[1]
        topics = Topics.for_chain(genesis.chain_id)
        attacker = P2PNode(NodeKey.generate().seed, ["/ip4/127.0.0.1/tcp/0"], bootstrap=[victim_addr],
                           topics=[topics.consensus, topics.updates])
        captured: list[bytes] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(attacker.run)

            async def capture() -> None:
                async for m in attacker.inbound:
                    try:
                        if isinstance(decode_gossip(m.data), Vote):
                            captured.append(m.data)
                    except Exception:
                        pass

            nursery.start_soon(capture)
            with trio.fail_after(20):
                while victim not in attacker.connected_peers():
                    await trio.sleep(0.1)
            await trio.sleep(2)
            start = min(_heights(views))
            t0 = time.monotonic()
            sent = await _attack(attacker, genesis, victim, captured, views)
            await _wait_heights(views, start + 3, 90, procs)
            nursery.cancel_scope.cancel()
        assert sent["gossip"] > 100 and sent["requests"] > 100
        assert time.monotonic() - t0 < 120
        assert all(p.poll() is None for p in procs), "a node died under attack"
        counters = json.loads((tmp_path / "node0" / "data" / "status.json").read_text())["counters"]
        rejected = {k: v for k, v in counters.items() if k.startswith("rejected_")}
        assert rejected.get("rejected_malformed", 0) > 0, rejected
        assert rejected.get("rejected_bad_signature", 0) > 0, rejected
        assert rejected.get("rejected_not_participant", 0) > 0, rejected
        net = json.loads((tmp_path / "node0" / "data" / "status.json").read_text())["net"]
        assert net["consensus_cut_off"] + net["consensus_rejected_streams"] > 0, net
    finally:
        stop_nodes(procs)
    assert len(model_hashes_at(views, min(_heights(views)))) == 1
