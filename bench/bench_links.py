"""CPU per consensus message over the two link kinds of ConsensusTransport: py-libp2p streams (yamux + noise) and
the direct encrypted TCP link (node/net/direct.py). All nodes run in this one process, so process CPU time per
delivered message is the cost of sending plus receiving it, independent of other load on the machine.

    python -m bench.bench_links [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import trio
from flnode.node.net import ConsensusTransport, P2PNode, peer_id_of
from flnode.node.net.consensus_stream import DirectConfig
from flnode.protocol.crypto import NodeKey

from bench.common import print_table, write_json

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


async def one(n: int, size: int, rounds: int, direct: bool) -> dict[str, Any]:
    keys = [NodeKey.generate() for _ in range(n)]
    ids = {peer_id_of(k.public_key) for k in keys}
    nodes: list[P2PNode] = []
    ts: list[ConsensusTransport] = []
    async with trio.open_nursery() as nursery:
        for k in keys:
            boot = [x.listen_addrs()[0] for x in nodes]
            node = P2PNode(k.seed, LOCAL, bootstrap=boot)
            t = ConsensusTransport(node, ids, direct=DirectConfig(k, "bench", "127.0.0.1") if direct else None)
            await nursery.start(node.run)
            await nursery.start(t.run)
            nodes.append(node)
            ts.append(t)
        with trio.fail_after(30):
            for i, t in enumerate(ts):
                await t.wait_connected(peer_id_of(k.public_key) for j, k in enumerate(keys) if j != i)
        want = rounds * (n - 1)
        got = [0] * n

        async def drain(i: int) -> None:
            while got[i] < want:
                await ts[i].inbound.receive()
                got[i] += 1

        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as inner:
            for i in range(n):
                inner.start_soon(drain, i)
            for r in range(rounds):  # one message per node per step, as a vote is: each step is its own write
                for i, t in enumerate(ts):
                    t.broadcast(b"%d-%d-" % (i, r) + os.urandom(size), height=1, round=0)
                await trio.sleep(0.003)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        delivered = sum(got)
        writes = sum(t.counters["writes"] for t in ts)
        nursery.cancel_scope.cancel()
    return {
        "link": "direct" if direct else "libp2p",
        "nodes": n,
        "msg_bytes": size,
        "messages": delivered,
        "cpu_us_per_msg": round(cpu / delivered * 1e6, 1),
        "cpu_us_per_write": round(cpu / max(1, writes) * 1e6, 1),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 100 if args.quick else 400
    rows = []
    for size in (200, 2000):
        for direct in (False, True):
            rows.append(trio.run(one, 4, size, rounds, direct))
    print_table("consensus transport: CPU per delivered message (send + receive), 4 nodes in one process", rows)
    write_json("links", {"rounds": rounds, "rows": rows})


if __name__ == "__main__":
    main()
