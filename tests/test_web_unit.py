"""The web explorer's pieces without a network: pacing, charts, escaping, the Prometheus exposition and the
metrics-only app (run through the ASGI interface, as hypercorn calls it)."""

from __future__ import annotations

import re
from typing import Any

import trio
import trio.testing
from flnode.node.metrics import Metrics
from flnode.node.web import pages
from flnode.node.web.app import Pacer, metrics_only_app


async def test_pacer_bounds_the_answer_rate_after_a_burst(autojump_clock: trio.testing.MockClock) -> None:
    # an autojumping clock: the test takes no wall time and measures the pacer, not the loaded machine
    pacer = Pacer(rate=100, burst=20)
    done: list[float] = []
    t0 = trio.current_time()
    for _ in range(120):
        await pacer.wait()
        done.append(trio.current_time() - t0)
    assert max(done[:21]) < 1e-9  # the burst goes through at once
    assert 0.98 <= done[-1] <= 1.01  # then one every 10 ms: 99 more take ~0.99 s
    assert all(b - a <= 0.0101 for a, b in zip(done, done[1:], strict=False))


async def test_pacer_lines_per_client_bound_the_backlog_and_give_back_slots(
        autojump_clock: trio.testing.MockClock) -> None:
    """A client with many requests waiting gets no more in line (False: the app answers 503); another client
    is not behind them; cancelled waits give their slots back."""
    pacer = Pacer(rate=10, burst=1, per_client=4, backlog=6)
    verdicts: list[bool] = []
    served: dict[str, float] = {}
    t0 = trio.current_time()

    async def ask(client: str) -> None:
        verdicts.append(await pacer.wait(client))
        served[client] = trio.current_time() - t0

    async with trio.open_nursery() as n:
        for _ in range(50):
            n.start_soon(ask, "flood")
        await trio.sleep(0.001)
        # two go through at once (the burst), four wait in the flood's line, the rest are refused
        assert verdicts == [True, True] + [False] * 44 and pacer.waiting == 4
        n.start_soon(ask, "honest")
    assert served["honest"] <= 0.11 and verdicts.count(True) == 7  # next in the shared line, not behind 48
    with trio.CancelScope() as scope:  # abandoned waits (a flood that disconnected) hold nothing
        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(pacer.wait, f"gone{i}")
            await trio.sleep(0.001)
            assert pacer.waiting == 6 and not await pacer.wait("honest")  # the backlog is full: 503
            scope.cancel()
    assert pacer.waiting == 0
    t1 = trio.current_time()
    assert await pacer.wait("honest") and trio.current_time() - t1 <= 0.2  # its own slot, not after six


async def test_web_app_answers_503_past_the_backlog_and_forgets_a_client_that_left(tmp_path: Any) -> None:
    from flnode.cli.node_cmd import create_testnet
    from flnode.node.chain.store import ChainStore
    from flnode.node.web.app import WebApp
    from flnode.protocol.genesis import Genesis

    create_testnet(tmp_path, 4, chain_id="busy", listen_host="127.0.0.1", ports=[1, 2, 3, 4], force=True)
    genesis = Genesis.load(tmp_path / "node0" / "genesis.json")
    db = tmp_path / "node0" / "data" / "chain.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    ChainStore.open(db, genesis_hash=genesis.hash()).close()
    app = WebApp(db, genesis, max_rate=1)
    app.pacer = Pacer(rate=0.5, burst=1, per_client=2, backlog=64)  # the waiting ones' slots: 2 s and 4 s away
    try:
        gone = trio.Event()
        answers: list[int] = []

        async def call(client: str) -> None:
            answers.append((await _call(app, "GET", "/api/status", client, gone))[0])

        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(call, "10.0.0.9")
            with trio.fail_after(1.5):
                while len(answers) < 3:
                    await trio.sleep(0.01)
            assert sorted(answers) == [200, 200, 503] and app.pacer.waiting == 2
            status, headers, _ = await _call(app, "GET", "/api/status", "10.0.0.9")
            assert status == 503 and int(headers[b"retry-after"]) >= 1
            gone.set()  # the flood disconnects: both waiting requests end with no answer and free their slots
        assert sorted(answers) == [0, 0, 200, 200, 503] and app.pacer.waiting == 0
    finally:
        app.reader.close()


def test_line_chart_skips_missing_points_and_survives_a_flat_series() -> None:
    svg = pages.line_chart("c", "t", [1, 2, 3, 4], [0.5, None, 0.7, 0.9], color="#000", fmt=".2f")
    assert 'data-points="3"' in svg
    points = re.search(r'\spoints="([^"]+)"', svg).group(1).split()  # type: ignore[union-attr]
    assert len(points) == 3
    ys = [float(p.split(",")[1]) for p in points]
    assert ys[0] > ys[1] > ys[2]  # higher values are drawn higher (smaller y)
    flat = pages.line_chart("f", "t", [1, 2], [0.25, 0.25], color="#000", fmt=".2f")
    assert "nan" not in flat and "inf" not in flat and 'data-points="2"' in flat
    assert "no data yet" in pages.line_chart("e", "t", [1, 2], [None, None], color="#000", fmt=".2f")


def _detail(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "height": 7, "round": 0, "proposer": "node1", "accepted": 1, "rejected": 1, "aggregator": "fedavg",
        "model_hash": "ab" * 32, "block_hash": "cd" * 32, "test_accuracy": 0.9, "round_time_s": 0.1, "rewards": 3,
        "slashed": [], "prev_block_hash": "ef" * 32, "app_hash": "12" * 32, "evidence": 0, "privacy": [],
        "updates": [
            {"author": "node0", "samples": 10, "local_loss": 0.5, "outcome": "accepted", "reward": 3, "penalty": 0},
            {"author": "<script>alert(1)</script>", "samples": 1, "local_loss": 9.0,
             "outcome": "rejected: norm_too_large", "reward": 0, "penalty": 2},
        ],
        "participants": [{"name": "node0", "public_key": "00" * 32, "balance": 3, "reputation": 100,
                          "excluded": False, "slashed_from": None}],
        "signers": ["node0", "node1", "node2"], "evidence_validators": [],
    }
    d.update(over)
    return d


def test_block_page_escapes_chain_values_and_lists_every_update() -> None:
    html = pages.block_page("chain<&>", _detail())
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "chain&lt;&amp;&gt;" in html
    assert html.count('<tr class="update') == 2
    assert "rejected: norm_too_large" in html and "node0, node1, node2" in html
    assert "flnode chain verify --home" in html
    assert "<script>" not in html  # the only script is /static/app.js (CSP: script-src 'self')


def test_metrics_are_prometheus_text() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics()
    m.inc("blocks_committed", 3)
    m.set("height", 12)
    families = {f.name: f for f in text_string_to_metric_families(m.render())}
    assert families["flnode_blocks_committed"].type == "counter"
    assert families["flnode_blocks_committed"].samples[0].name == "flnode_blocks_committed_total"
    assert families["flnode_blocks_committed"].samples[0].value == 3
    assert families["flnode_height"].type == "gauge" and families["flnode_height"].samples[0].value == 12


async def _call(app: Any, method: str, path: str, client: str = "127.0.0.1",
                gone: trio.Event | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request as an ASGI server makes it: the (empty) body, then http.disconnect once `gone` is set."""
    sent: list[dict[str, Any]] = []
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await (gone if gone is not None else trio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": [],
             "client": (client, 40000)}
    await app(scope, receive, send)
    if not sent:
        return 0, {}, b""  # no answer: the client had gone
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


async def test_metrics_only_app_serves_metrics_and_nothing_else() -> None:
    m = Metrics()
    m.set("height", 4)
    app = metrics_only_app(m)
    status, headers, body = await _call(app, "GET", "/metrics")
    assert status == 200 and b"flnode_height 4.0" in body
    assert headers[b"content-type"].startswith(b"text/plain")
    assert (await _call(app, "GET", "/"))[0] == 404
    status, headers, _ = await _call(app, "POST", "/metrics")
    assert status == 405 and headers[b"allow"] == b"GET, HEAD"
    status, _, body = await _call(app, "HEAD", "/metrics")
    assert status == 200 and body == b""


async def test_a_fresh_store_renders_every_page(tmp_path: Any) -> None:
    """A node that has committed nothing yet: every page and API answers, with height 0 and empty lists."""
    import json as _json

    from flnode.cli.node_cmd import create_testnet
    from flnode.node.chain.store import ChainStore
    from flnode.node.web.app import WebApp
    from flnode.protocol.genesis import Genesis

    create_testnet(tmp_path, 4, chain_id="fresh", listen_host="127.0.0.1", ports=[1, 2, 3, 4], force=True)
    genesis = Genesis.load(tmp_path / "node0" / "genesis.json")
    db = tmp_path / "node0" / "data" / "chain.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    ChainStore.open(db, genesis_hash=genesis.hash()).close()  # the tables, no block
    app = WebApp(db, genesis)
    try:
        for path in ("/", "/blocks", "/participants", "/api/status", "/api/blocks", "/api/participants"):
            status, _, body = await _call(app, "GET", path)
            assert status == 200, (path, body[:200])
        status, _, body = await _call(app, "GET", "/api/status")
        assert _json.loads(body)["height"] == 0
        assert _json.loads((await _call(app, "GET", "/api/blocks"))[2])["blocks"] == []
        parts = _json.loads((await _call(app, "GET", "/api/participants"))[2])["participants"]
        assert len(parts) == 4 and all(p["accepted"] == 0 and p["balance"] == 0 for p in parts)
        assert (await _call(app, "GET", "/api/blocks/1"))[0] == 404
        assert b"no data yet" in (await _call(app, "GET", "/"))[2]
    finally:
        app.reader.close()


async def test_serve_metrics_answers_prometheus_text_on_its_own_port() -> None:
    """metrics_listen: /metrics alone, over real HTTP on 127.0.0.1."""
    from flnode.cli.testnet import free_ports
    from flnode.node.web import serve_metrics

    metrics = Metrics()
    metrics.inc("blocks_committed", 3)
    port = free_ports(1)[0]
    async with trio.open_nursery() as n:
        await n.start(serve_metrics, metrics, f"127.0.0.1:{port}")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                reply += chunk
        n.cancel_scope.cancel()
    assert reply.startswith(b"HTTP/1.1 200") and b"flnode_blocks_committed_total 3.0" in reply
