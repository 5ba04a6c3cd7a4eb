"""The web explorer of a real running network: four `flnode start` processes on 127.0.0.1, node0 with
`http_listen` on (as `flnode demo` sets it). One network for the module (start-up is the expensive part).

- the JSON API against the running node: schemas equal to `flnode chain show --json`, paging, 404, 400, 405;
- limits: oversized headers, slow clients, no key material in any response;
- a real headless Chromium (Debian's `chromium`) driven over the DevTools protocol: the overview's height rises
  in place (polling), the accuracy chart is drawn, a block page lists every update; screenshots are saved.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from flnode.cli.demo import NodeView, enable_web, free_ports, start_node, stop_nodes
from flnode.cli.node_cmd import _task_and_rules, create_testnet

pytestmark = pytest.mark.slow
HTTP_TIMEOUT = 10.0


@dataclass
class Net:
    root: Path
    views: list[NodeView]
    url: str  # node0's explorer, ends with /

    @property
    def home(self) -> Path:
        return self.views[0].home


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def get_json(url: str) -> Any:
    status, headers, body = get(url)
    assert status == 200, (url, status, body[:300])
    assert headers["content-type"] == "application/json"
    return json.loads(body)


def cli_json(*args: str) -> Any:
    res = subprocess.run([sys.executable, "-m", "flnode.cli.main", *args], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


def _tail(home: Path) -> str:
    try:
        return (home / "node.log").read_text()[-2000:]
    except OSError:
        return "(no log)"


def wait_status(net: Net, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = get_json(net.url + "api/status")
            if pred(last):
                return last  # type: ignore[no-any-return]
        except (OSError, AssertionError) as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout}s; last status {last}; log: {_tail(net.home)}")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("webnet")
    n = 4
    create_testnet(
        root, n, chain_id="web-test", host="127.0.0.1", listen_host="127.0.0.1", ports=free_ports(n),
        task_rules=_task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 1500), force=True,
    )
    url = enable_web(root / "node0", port=free_ports(1)[0])
    views = [NodeView(f"node{i}", root / f"node{i}") for i in range(n)]
    procs = [start_node(v.home) for v in views]
    net = Net(root, views, url)
    try:
        wait_status(net, lambda s: s["height"] >= 6, 90, "height 6")
        yield net
    finally:
        stop_nodes(procs)


def wait_metrics(net: Net, heights: range, timeout: float = 20) -> None:
    """Test accuracy lands a moment after each commit; compare rows only once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = get_json(f"{net.url}api/blocks?from={heights.start}&to={heights.stop - 1}")["blocks"]
        if len(rows) == len(heights) and all(r["test_accuracy"] is not None for r in rows):
            return
        time.sleep(0.2)
    raise AssertionError(f"metrics of heights {heights} missing")


# ---------------------------------------------------------------- JSON API


def test_status_schema(net: Net) -> None:
    s = wait_status(net, lambda s: s["validators_online"] == 4 and s["peers"] >= 3, 30, "all validators online")
    assert s["chain_id"] == "web-test"
    assert s["moniker"] == "node0" and s["validators"] == 4
    assert isinstance(s["height"], int) and s["height"] >= 6
    assert len(s["model_hash"]) == 64 and int(s["model_hash"], 16) >= 0
    assert s["round_time_s"] > 0 and 0 <= s["test_accuracy"] <= 1
    assert s["halted"] is None
    assert s["consensus_height"] >= s["height"]
    assert s["model"] == "logreg" and s["dataset"] == "digits" and s["aggregator"] == "fedavg"


def test_blocks_have_the_chain_show_schema_and_page(net: Net) -> None:
    wait_metrics(net, range(1, 6))
    api = get_json(f"{net.url}api/blocks?from=1&to=5")
    assert api["chain_id"] == "web-test" and api["height"] >= 6
    assert [r["height"] for r in api["blocks"]] == [1, 2, 3, 4, 5]
    cli = cli_json("chain", "show", "--home", str(net.home), "--json", "--last", "1000")
    assert set(cli) == set(api)
    by_height = {r["height"]: r for r in cli["blocks"]}
    for row in api["blocks"]:
        assert row == by_height[row["height"]]  # same keys, same values

    # paging: from alone gives up to 100 heights; to past the tip is clipped; no parameters = the last 30
    tail = get_json(f"{net.url}api/blocks?from=2")
    assert tail["blocks"][0]["height"] == 2 and len(tail["blocks"]) == min(100, tail["height"] - 1)
    clipped = get_json(f"{net.url}api/blocks?from=3&to=90")
    assert [r["height"] for r in clipped["blocks"]] == list(range(3, min(90, clipped["height"]) + 1))
    last = get_json(f"{net.url}api/blocks")
    assert last["blocks"][-1]["height"] == last["height"] and len(last["blocks"]) == min(30, last["height"])
    assert get_json(f"{net.url}api/blocks?to=4")["blocks"][-1]["height"] == 4


def test_block_detail_is_chain_show_height_plus_signers(net: Net) -> None:
    wait_metrics(net, range(3, 4))
    api = get_json(f"{net.url}api/blocks/3")
    cli = cli_json("chain", "show", "--home", str(net.home), "--height", "3", "--json")
    extra = {"signers", "evidence_validators"}
    assert set(api) - set(cli) == extra
    assert {k: v for k, v in api.items() if k not in extra} == cli
    assert len(api["signers"]) >= 3 and set(api["signers"]) <= {"node0", "node1", "node2", "node3"}
    assert api["updates"] and all(u["outcome"] == "accepted" for u in api["updates"])
    assert api["evidence"] == 0 and api["evidence_validators"] == []


def test_participants_count_every_update(net: Net) -> None:
    p = get_json(f"{net.url}api/participants")
    top = p["height"]
    assert [r["name"] for r in sorted(p["participants"], key=lambda r: r["name"])] == [f"node{i}" for i in range(4)]
    rows: list[dict[str, Any]] = []
    for lo in range(1, top + 1, 100):
        rows += get_json(f"{net.url}api/blocks?from={lo}&to={min(top, lo + 99)}")["blocks"]
    assert sum(r["accepted"] for r in p["participants"]) == sum(r["accepted"] for r in rows)
    assert sum(r["rejected"] for r in p["participants"]) == sum(r["rejected"] for r in rows)
    at_top = {q["name"]: q for q in get_json(f"{net.url}api/blocks/{top}")["participants"]}
    for r in p["participants"]:
        q = at_top[r["name"]]
        assert (r["balance"], r["reputation"], r["excluded"]) == (q["balance"], q["reputation"], q["excluded"])
        assert r["balance"] > 0 and r["accepted"] >= 1


def test_members_of_a_genesis_network(net: Net) -> None:
    m = get_json(f"{net.url}api/members")
    assert m["chain_id"] == "web-test" and m["height"] >= 6
    assert [(r["name"], r["genesis"], r["in_force"], r["power"] > 0) for r in sorted(m["members"], key=lambda r: r["name"])] \
        == [(f"node{i}", True, True, True) for i in range(4)]
    assert m["requests"] == [] and m["removals"] == []
    status, _, body = get(net.url + "participants")
    assert status == 200 and body.decode().count("<table id=members>") == 1


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("api/blocks/123456789", 404),
        ("api/blocks/0", 404),
        ("api/blocks/abc", 400),
        ("api/blocks/-1", 400),
        ("api/blocks?from=abc", 400),
        ("api/blocks?from=0", 400),
        ("api/blocks?from=5&to=2", 400),
        ("api/blocks?from=1&to=500", 400),
        ("api/blocks?to=1e3", 400),
        ("api/blocks?from=" + "9" * 300, 400),
        ("api/nothing", 404),
        ("blocks/123456789", 404),
        ("blocks?page=x", 400),
        ("blocks?page=100000", 404),
        ("nothing", 404),
        ("api/live?view=bogus", 400),
        ("api/live?view=overview&height=x", 400),
    ],
)
def test_bad_requests(net: Net, path: str, status: int) -> None:
    code, headers, body = get(net.url + path)
    assert code == status, body[:300]
    if path.startswith("api/"):
        assert json.loads(body)["status"] == status
    else:
        assert headers["content-type"].startswith("text/html")


def test_live_sends_the_section_only_when_the_height_moved(net: Net) -> None:
    for view, marker in (("overview", 'id="chart-accuracy"'), ("blocks", "<tr data-height="),
                         ("participants", "<table id=participants>")):
        live = get_json(f"{net.url}api/live?view={view}&height=0")
        assert live["status"]["chain_id"] == "web-test" and marker in live["html"]
    for _ in range(20):  # the height may move between the two reads; then the section comes along, as it should
        h = get_json(net.url + "api/status")["height"]
        live = get_json(f"{net.url}api/live?view=overview&height={h}")
        if live["status"]["height"] == h:
            assert live["html"] is None
            return
    raise AssertionError("never caught one height twice")


def test_read_only_methods(net: Net) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        code, headers, _ = get(net.url + "api/status", method=method)
        assert code == 405 and headers["allow"] == "GET, HEAD"
    code, headers, body = get(net.url + "api/status", method="HEAD")
    assert code == 200 and body == b"" and int(headers["content-length"]) > 0
    port = int(net.url.rstrip("/").rsplit(":", 1)[1])
    reply = _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                       b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert reply.split(b" ", 2)[1] == b"403", reply[:100]  # no websockets: refused, not a server error


def test_pages_render_and_carry_no_key_material(net: Net) -> None:
    seeds = [json.loads((v.home / "node_key.json").read_text())["seed"] for v in net.views]
    top = get_json(net.url + "api/status")["height"]
    for path in ("", "blocks", "blocks?page=1", f"blocks/{top}", "participants", "api/status", "api/blocks",
                 f"api/blocks/{top}", "api/participants", "api/members", "metrics", "static/app.js", "static/style.css",
                 "?fragment=1", "participants?fragment=1"):
        code, headers, body = get(net.url + path)
        assert code == 200, path
        assert headers["cache-control"] == "no-store" and headers["x-content-type-options"] == "nosniff"
        assert "script-src 'self'" in headers["content-security-policy"]
        text = body.decode()
        for seed in seeds:
            assert seed not in text and seed.upper() not in text, f"a node seed in {path}"
    code, _, body = get(net.url)
    page = body.decode()
    assert 'id="chart-accuracy"' in page and "<polyline" in page and 'data-field="height"' in page
    assert "<script>" not in page and "style=" not in page  # the CSP forbids inline code: none is needed
    code, _, body = get(net.url + "blocks")
    shown = int(re.search(r'<body data-height="([0-9]+)"', body.decode()).group(1))  # type: ignore[union-attr]
    assert shown >= top and body.decode().count('<tr data-height="') == min(25, shown)


def test_metrics_in_prometheus_format(net: Net) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    code, headers, body = get(net.url + "metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["flnode_height"].type == "gauge" and families["flnode_height"].samples[0].value >= 6
    assert families["flnode_blocks_committed"].type == "counter"


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return out


def test_oversized_and_slow_clients_do_not_stall_the_server(net: Net) -> None:
    port = int(net.url.rstrip("/").rsplit(":", 1)[1])
    # 64 KiB of headers: refused (h11's limit is 8 KiB here), not buffered
    reply = _raw(port, b"GET /api/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
    assert reply == b"" or reply.split(b" ", 2)[1] in (b"400", b"413", b"431"), reply[:100]
    # 40 clients that send half a request line and then nothing
    slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        for s in slow:
            s.sendall(b"GET /api/sta")
        h0 = get_json(net.url + "api/status")["height"]
        t0 = time.monotonic()
        for _ in range(10):
            get_json(net.url + "api/status")
        assert time.monotonic() - t0 < 5.0  # ten requests answered while 40 connections hang
        wait_status(net, lambda s: s["height"] > h0 + 1, 30, "consensus going on beside slow clients")
    finally:
        for s in slow:
            s.close()


def test_abandoned_requests_do_not_delay_an_honest_page(net: Net) -> None:
    """1000 requests sent and abandoned at once (a flood that disconnects): each either waited in its client's
    short line and gave its slot back when its connection closed, or was answered 503 at once; an honest request
    right after is answered within two seconds (one global queue made it wait ~10 s)."""
    port = int(net.url.rstrip("/").rsplit(":", 1)[1])
    for _ in range(10):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
        for sock in socks:
            sock.sendall(b"GET /api/blocks?limit=5 HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in socks:
            sock.close()
    time.sleep(0.3)
    t0 = time.monotonic()
    deadline = t0 + 10
    while True:  # 503 (with Retry-After) is an answer too, while the flood's connections are still closing
        status, headers, body = get(net.url + "api/status")
        if status == 200:
            break
        assert status == 503 and int(headers["retry-after"]) >= 1 and time.monotonic() < deadline, (status, body)
        time.sleep(0.1)
    assert time.monotonic() - t0 < 2.0


# ---------------------------------------------------------------- the real browser


@pytest.fixture(scope="module")  # module scope: resolved (and skipped) before the module's network starts
def chromium() -> str:
    """Debian's chromium binary. `make test` installs it (tests/system_deps.sh) and sets FLNODE_REQUIRE_CHROMIUM,
    so there the test fails rather than skips when it is missing."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    why = ("no chromium binary on PATH: install Debian's `chromium` package (tests/system_deps.sh does so with "
           "apt-get when run as root) to run the real-browser test")
    if os.environ.get("FLNODE_REQUIRE_CHROMIUM"):
        pytest.fail(why)
    pytest.skip(why)


class DevTools:
    """The few DevTools-protocol calls the test needs, over trio-websocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        me = self.next_id
        await self.ws.send_message(json.dumps({"id": me, "method": method, "params": params}))
        with trio.fail_after(30):
            while True:
                msg = json.loads(await self.ws.get_message())
                if msg.get("id") == me:
                    if "error" in msg:
                        raise AssertionError(f"{method}: {msg['error']}")
                    return msg["result"]  # type: ignore[no-any-return]

    async def eval(self, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        with trio.move_on_after(timeout):
            while True:
                value = await self.eval(expression)
                if value:
                    return value
                await trio.sleep(0.2)
        raise AssertionError(f"browser: {what} not seen in {timeout}s")

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", 20,
                            f"{url} loaded")

    async def screenshot(self, path: Path) -> None:
        r = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(r["data"]))


async def _launch(chromium: str, profile: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start headless Chromium; the page target's DevTools websocket URL."""
    log = profile / "chromium.log"
    profile.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--window-size=1280,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"), stdin=subprocess.DEVNULL,  # noqa: SIM115
    )
    port_file = profile / "DevToolsActivePort"  # Chromium writes its chosen port here
    with trio.move_on_after(30):
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None, "chromium exited: " + log.read_text()[-2000:]
            await trio.sleep(0.1)
    assert port_file.exists(), "chromium did not open its DevTools port in 30 s: " + log.read_text()[-2000:]
    port = int(port_file.read_text().split()[0])
    with trio.fail_after(20):
        while True:
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return proc, pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            await trio.sleep(0.2)


async def test_browser_shows_the_live_network(chromium: str, net: Net, tmp_path: Path) -> None:
    from trio_websocket import open_websocket_url

    proc, ws_url = await _launch(chromium, tmp_path / "profile")
    try:
        async with open_websocket_url(ws_url, max_message_size=64 << 20) as ws:
            dt = DevTools(ws)
            await dt.call("Page.enable")
            await dt.open(net.url)
            # the first poll answered (the badge turns live), then the height rises in place, with no reload
            await dt.wait_for("document.getElementById('live').textContent.startsWith('live')", 15, "live badge")
            h0 = int(await dt.eval("document.querySelector('[data-field=height]').textContent"))
            assert h0 >= 6
            await dt.eval("window.__same_page = true")
            h1 = await dt.wait_for(
                f"(() => {{ const h = +document.querySelector('[data-field=height]').textContent;"
                f" return h > {h0} ? h : 0 }})()", 30, "height increase on the page")
            assert await dt.eval("window.__same_page === true")  # polled in place, not reloaded
            points = await dt.eval("+document.querySelector('svg#chart-accuracy').dataset.points")
            drawn = await dt.eval("document.querySelector('svg#chart-accuracy polyline')"
                                  ".getAttribute('points').trim().split(/\\s+/).length")
            assert points >= 2 and drawn == points  # one vertex per height whose accuracy is recorded
            assert await dt.eval("!!document.querySelector('svg#chart-round-time polyline')")
            await dt.wait_for(f"document.querySelector('#overview-live tbody tr').dataset.height >= {h1}", 10,
                              "the latest-blocks table refreshed")
            await dt.screenshot(tmp_path / "overview.png")

            block = get_json(f"{net.url}api/blocks/{h1 - 1}")
            await dt.open(f"{net.url}blocks/{h1 - 1}")
            assert await dt.eval("document.querySelector('h1').textContent") == f"Block {h1 - 1}"
            authors = await dt.eval(
                "[...document.querySelectorAll('#updates tbody tr')].map(r => r.cells[0].textContent)")
            assert authors == [u["author"] for u in block["updates"]] and authors
            outcomes = await dt.eval(
                "[...document.querySelectorAll('#updates tbody tr')].map(r => r.cells[4].textContent)")
            assert outcomes == [u["outcome"] for u in block["updates"]]
            assert "flnode chain verify" in await dt.eval("document.querySelector('pre.verify').textContent")
            text = await dt.eval("document.body.innerText")
            assert block["proposer"] in text and block["model_hash"] in text and block["app_hash"] in text
            await dt.screenshot(tmp_path / "block.png")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for name in ("overview.png", "block.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    if os.environ.get("FLNODE_WEB_SCREENSHOTS"):  # keep them somewhere visible (used for the README picture)
        dest = Path(os.environ["FLNODE_WEB_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("overview.png", "block.png"):
            shutil.copy(tmp_path / name, dest / name)
