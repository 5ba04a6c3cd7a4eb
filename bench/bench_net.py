"""The network adapter on loopback: direct-stream throughput for big blobs, and gossip latency.

    python -m bench.bench_net [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import trio
from flnode.node.net import P2PNode
from flnode.protocol.crypto import NodeKey

from bench.common import print_table, write_json

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


async def throughput(sizes_mb: list[int]) -> list[dict[str, object]]:
    rows = []
    async with trio.open_nursery() as nursery:
        a = P2PNode(NodeKey.generate().seed, LOCAL, topics=["t"])
        blobs = {s: os.urandom(s << 20) for s in sizes_mb}

        async def serve(peer: str, req: bytes) -> bytes:
            return blobs[int(req)]

        a.set_handler("/bench/blob/1", serve)
        await nursery.start(a.run)
        b = P2PNode(NodeKey.generate().seed, LOCAL, topics=["t"], bootstrap=[a.listen_addrs()[0]])
        await nursery.start(b.run)
        while not b.connected_peers():
            await trio.sleep(0.05)
        for s in sizes_mb:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                got = await b.request(a.peer_id, "/bench/blob/1", str(s).encode(), max_response=(s << 20) + 16, timeout=120)
                times.append(time.perf_counter() - t0)
                assert len(got) == s << 20
            best = min(times)
            rows.append({"size_mb": s, "best_s": round(best, 3), "median_s": round(statistics.median(times), 3),
                         "mb_per_s": round(s / best, 1)})
        nursery.cancel_scope.cancel()
    return rows


async def gossip_latency(n: int, messages: int) -> dict[str, object]:
    lat: list[float] = []
    async with trio.open_nursery() as nursery:
        nodes = []
        for _i in range(n):
            boot = [x.listen_addrs()[0] for x in nodes]
            node = P2PNode(NodeKey.generate().seed, LOCAL, topics=["t"], bootstrap=boot)
            await nursery.start(node.run)
            nodes.append(node)
        with trio.fail_after(20):
            while any(len(x.connected_peers()) < n - 1 for x in nodes):
                await trio.sleep(0.05)
        await trio.sleep(1.5)

        async def recv(node: P2PNode) -> None:
            async for m in node.inbound:
                sent = float(m.data.split(b"|")[1])
                lat.append((time.perf_counter() - sent) * 1000)

        for x in nodes:
            nursery.start_soon(recv, x)
        for k in range(messages):
            await nodes[k % n].publish("t", b"%d|%.9f|" % (k, time.perf_counter()) + b"x" * 1000)
            await trio.sleep(0.02)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    lat.sort()
    return {"nodes": n, "messages": messages, "deliveries": len(lat), "expected": messages * n,
            "p50_ms": round(lat[len(lat) // 2], 2) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)], 2) if lat else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    sizes = [1, 10, 50] if a.quick else [1, 10, 100]
    tp = trio.run(throughput, sizes)
    print_table("direct stream throughput on loopback (in-process, 2 hosts)", tp)
    gl = [trio.run(gossip_latency, n, 100 if a.quick else 300) for n in (4, 8)]
    print_table("gossip latency on loopback, 1 KB messages (in-process hosts share one CPU core)", gl)
    write_json("net", {"throughput": tp, "gossip": gl})


if __name__ == "__main__":
    main()
