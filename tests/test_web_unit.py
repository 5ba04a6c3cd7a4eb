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


async def _call(app: Any, method: str, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": []}
    await app(scope, receive, send)
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
