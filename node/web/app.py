"""A tiny read-only ASGI app: a handful of GET routes, JSON or server-rendered HTML, nothing else.

No framework: the routes fit in one table, and owning the parsing of two query parameters keeps the attack
surface small. Only GET and HEAD; no request body is ever read; every response carries no-store and a strict
Content-Security-Policy (scripts and styles only from this origin).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import trio
from flnode.node.metrics import Metrics
from flnode.protocol.genesis import Genesis

from . import pages
from .reader import MAX_PAGE, ChainReader

log = logging.getLogger("flnode.web")

Live = Callable[[], dict[str, Any]]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
     b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
]
MAX_QUERY_BYTES = 256
PAGE_SIZE = 25  # rows of the HTML blocks table
CACHE_TTL_S = 0.5  # a successful response is reused this long (the page polls every second)
MAX_REQUESTS_PER_S = 100.0  # ~6 % of a core at ~0.6 ms of server CPU each; 50 open pages poll 50 a second


class _Schedule:
    """One token bucket as a schedule: the next free answer slot, ``interval`` apart after a burst."""

    def __init__(self, rate: float, burst: int) -> None:
        self.interval = 1.0 / rate
        self.burst = burst
        self.next = -1e9
        self.waiting = 0

    async def take(self) -> None:
        now = trio.current_time()
        slot = max(self.next, now - self.burst * self.interval)
        self.next = slot + self.interval
        if slot <= now:
            return
        try:
            await trio.sleep_until(slot)
        except trio.Cancelled:  # the client left: its slot goes to whoever asks next
            self.next -= self.interval
            raise


class Pacer:
    """At most ``rate`` requests a second get an answer (after a burst of ``burst``); the others wait their turn,
    which costs no CPU. An HTTP/1.1 client sends its next request only after the answer, so this also bounds how
    fast a flooding client makes the server parse: the node's CPU stays with consensus.

    Each client (by address) waits in its own line first, at most ``per_client`` of its requests at a time, and
    at most ``backlog`` wait in all: past either, ``wait`` answers False at once (the app sends 503 with
    Retry-After) instead of queueing work nobody may still want. A cancelled wait gives its slot back."""

    def __init__(self, rate: float, burst: int = 20, *, per_client: int = 8, backlog: int = 256,
                 max_clients: int = 1024) -> None:
        self.rate, self.burst = rate, burst
        self.per_client, self.backlog, self.max_clients = per_client, backlog, max_clients
        self.total = _Schedule(rate, burst)
        self.clients: OrderedDict[str, _Schedule] = OrderedDict()

    @property
    def waiting(self) -> int:
        return self.total.waiting

    def retry_after(self) -> int:
        """Seconds until the backlog has drained at the answer rate (at least 1)."""
        return max(1, math.ceil(self.waiting / self.rate))

    def _client(self, client: str) -> _Schedule:
        line = self.clients.get(client)
        if line is None:
            line = self.clients[client] = _Schedule(self.rate, self.burst)
            while len(self.clients) > self.max_clients:  # forget idle clients, oldest first
                idle = next((k for k, v in self.clients.items() if v.waiting == 0 and k != client), None)
                if idle is None:
                    break
                del self.clients[idle]
        self.clients.move_to_end(client)
        return line

    async def wait(self, client: str = "") -> bool:
        line = self._client(client)
        if line.waiting >= self.per_client or self.total.waiting >= self.backlog:
            return False
        line.waiting += 1
        self.total.waiting += 1
        try:
            await line.take()
            await self.total.take()
        finally:
            line.waiting -= 1
            self.total.waiting -= 1
        return True


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Response:
    def __init__(self, status: int, body: bytes, content_type: str, extra: list[tuple[bytes, bytes]] | None = None):
        self.status, self.body, self.content_type, self.extra = status, body, content_type, extra or []

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(value).encode(), "application/json")

    @classmethod
    def html(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), "text/html; charset=utf-8")

    async def send(self, send: Send, head_only: bool = False) -> None:
        headers = [(b"content-type", self.content_type.encode()), (b"content-length", str(len(self.body)).encode()),
                   *SECURITY_HEADERS, *self.extra]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head_only else self.body})


def _int_param(query: dict[str, str], name: str, default: int | None, lo: int = 1) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,12}", raw):
        raise HTTPError(400, f"{name} must be a non-negative integer, got {raw[:32]!r}")
    value = int(raw)
    if value < lo:
        raise HTTPError(400, f"{name} must be at least {lo}")
    return value


def _query(scope: Scope) -> dict[str, str]:
    raw: bytes = scope.get("query_string", b"")
    if len(raw) > MAX_QUERY_BYTES:
        raise HTTPError(400, "query string too long")
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False, max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "bad query string") from None
    return dict(pairs)


class WebApp:
    """The explorer for one chain store. ``live`` reads the running node (None: the store alone)."""

    def __init__(self, db: Path, genesis: Genesis, *, live: Live | None = None, metrics: Metrics | None = None,
                 connections: int = 2, max_rate: float = MAX_REQUESTS_PER_S) -> None:
        self.reader = ChainReader(db, genesis, connections=connections)
        self.genesis = genesis
        self.live = live
        self.metrics = metrics
        self._cache: dict[tuple[str, bytes], tuple[float, Response]] = {}
        self.pacer = Pacer(max_rate)
        self.exact: dict[str, Callable[..., Awaitable[Response]]] = {
            "/api/status": self.api_status, "/api/blocks": self.api_blocks, "/api/live": self.api_live,
            "/api/participants": self.api_participants, "/api/members": self.api_members, "/": self.page_overview, "/blocks": self.page_blocks,
            "/participants": self.page_participants, "/static/app.js": self.static_js,
            "/static/style.css": self.static_css, "/metrics": self.prometheus,
        }
        self.routes: list[tuple[re.Pattern[str], Callable[..., Awaitable[Response]]]] = [
            (re.compile(r"/api/blocks/([^/]{1,24})"), self.api_block),
            (re.compile(r"/blocks/([^/]{1,24})"), self.page_block),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] == "websocket":  # not served: closing before accept is a 403
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        method = scope["method"]
        admitted = await self._admit(scope, receive)
        if admitted is None:  # the client went away while it waited: nothing to answer
            return
        if not admitted:
            if self.metrics is not None:
                self.metrics.inc("web_busy")
            busy = Response.json({"error": "busy, retry later", "status": 503}, 503)
            busy.extra.append((b"retry-after", str(self.pacer.retry_after()).encode()))
            await busy.send(send, head_only=method == "HEAD")
            return
        try:
            if method not in ("GET", "HEAD"):
                raise HTTPError(405, "read-only: only GET and HEAD")
            response = await self.cached(scope["path"], scope.get("query_string", b""))
        except HTTPError as e:
            response = self.error(scope["path"], e.status, e.message)
        except Exception:
            log.exception("web request failed", extra={"path": scope["path"][:200]})
            response = self.error(scope["path"], 500, "internal error")
        if response.status == 405:
            response.extra.append((b"allow", b"GET, HEAD"))
        await response.send(send, head_only=method == "HEAD")

    async def _admit(self, scope: Scope, receive: Receive) -> bool | None:
        """The pacer's verdict for this request, or None if the client disconnected while waiting (its slot is
        given back)."""
        client = str((scope.get("client") or ("",))[0])
        verdict: bool | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            verdict = await self.pacer.wait(client)
            nursery.cancel_scope.cancel()
        return verdict

    async def cached(self, path: str, raw_query: bytes) -> Response:
        """Many pollers of one URL cost one read and one render per CACHE_TTL_S: the node's loop is shared with
        consensus, so its work must not grow with the number of browsers."""
        key = (path, raw_query)
        now = trio.current_time()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < CACHE_TTL_S:
            return hit[1]
        response = await self.dispatch(path, _query({"query_string": raw_query}))
        if path != "/metrics":  # a scrape sees the counters as they are now
            if len(self._cache) >= 256:
                self._cache = {k: v for k, v in self._cache.items() if now - v[0] < CACHE_TTL_S}
                if len(self._cache) >= 256:
                    self._cache.clear()
            self._cache[key] = (now, response)
        return response

    async def dispatch(self, path: str, query: dict[str, str]) -> Response:
        handler = self.exact.get(path)
        if handler is not None:
            return await handler(query)
        for pattern, handler in self.routes:
            m = pattern.fullmatch(path)
            if m:
                return await handler(query, *m.groups())
        raise HTTPError(404, "no such page")

    def error(self, path: str, status: int, message: str) -> Response:
        if path.startswith("/api/"):
            return Response.json({"error": message, "status": status}, status)
        return Response.html(pages.error_page(self.genesis.chain_id, status, message), status)

    # ---------------------------------------------------------------- JSON API

    async def status(self) -> dict[str, Any]:
        series = await self.reader.run(lambda s: self.reader.series(s, last=20))
        times = [t for t in series["round_time_s"] if t is not None]
        accs = [a for a in series["test_accuracy"] if a is not None]
        out: dict[str, Any] = {
            "chain_id": self.genesis.chain_id,
            "height": series["height"],
            "round_time_s": times[-1] if times else None,
            "median_round_time_s": sorted(times)[len(times) // 2] if times else None,
            "test_accuracy": accs[-1] if accs else None,
            "aggregator": self.genesis.rules.aggregator,
            "model": self.genesis.task.model,
            "dataset": self.genesis.task.dataset,
            "validators": len(self.genesis.validators),
            "model_hash": None, "peers": None, "validators_online": None, "halted": None,
        }
        if self.live is not None:
            live = self.live()
            out.update(live)
            out["height"] = max(out["height"], live["height"])  # the node may be ahead of its last fsync'd read
        return out

    async def api_status(self, query: dict[str, str]) -> Response:
        return Response.json(await self.status())

    async def api_blocks(self, query: dict[str, str]) -> Response:
        start = _int_param(query, "from", None)
        end = _int_param(query, "to", None)
        if start is not None and end is not None and start > end:
            raise HTTPError(400, "from must not be greater than to")
        if start is not None and end is not None and end - start + 1 > MAX_PAGE:
            raise HTTPError(400, f"at most {MAX_PAGE} heights per request")

        def read(store: Any) -> dict[str, Any]:
            top = self.reader.latest(store)
            lo, hi = start, end
            if lo is None and hi is None:
                hi = top
            if lo is None:
                assert hi is not None
                lo = max(1, hi - 29)  # chain show's default: the last 30
            if hi is None:
                hi = lo + MAX_PAGE - 1
            return self.reader.blocks(store, lo, hi, top)

        return Response.json(await self.reader.run(read))

    async def _block(self, raw: str) -> dict[str, Any]:
        if not re.fullmatch(r"[0-9]{1,12}", raw):
            raise HTTPError(400, f"height must be a positive integer, got {raw!r}")
        h = int(raw)
        detail = await self.reader.run(lambda s: self.reader.block(s, h)) if h >= 1 else None
        if detail is None:
            raise HTTPError(404, f"height {h} is not committed")
        return detail

    async def api_block(self, query: dict[str, str], raw: str) -> Response:
        return Response.json(await self._block(raw))

    LIVE_SECTIONS = {"overview": ("/", b"fragment=1"), "blocks": ("/blocks", b"page=1&fragment=1"),
                     "participants": ("/participants", b"fragment=1")}

    async def api_live(self, query: dict[str, str]) -> Response:
        """What an open page needs each second, in one request: the status, and the page's live section
        re-rendered only if the height moved past the one the page shows (``?view=overview&height=H``)."""
        view = query.get("view", "")
        if view not in self.LIVE_SECTIONS:
            raise HTTPError(400, f"view must be one of {', '.join(self.LIVE_SECTIONS)}")
        shown = _int_param(query, "height", 0, lo=0)
        status_response = await self.cached("/api/status", b"")
        out: dict[str, Any] = {"status": json.loads(status_response.body), "html": None}
        if out["status"]["height"] != shown:
            path, raw = self.LIVE_SECTIONS[view]
            out["html"] = (await self.cached(path, raw)).body.decode()
        return Response.json(out)

    async def api_members(self, query: dict[str, str]) -> Response:
        return Response.json(await self.reader.run(self.reader.members))

    async def api_participants(self, query: dict[str, str]) -> Response:
        return Response.json(await self.reader.run(self.reader.participants))

    # ---------------------------------------------------------------- pages

    async def page_overview(self, query: dict[str, str]) -> Response:
        status = await self.status()
        series = await self.reader.run(self.reader.series)
        recent = await self.reader.run(lambda s: self.reader.blocks(s, max(1, series["height"] - 9), series["height"]))
        live = pages.overview_live(series, recent["blocks"])
        if query.get("fragment"):
            return Response.html(live)
        return Response.html(pages.overview(status, live))

    async def page_blocks(self, query: dict[str, str]) -> Response:
        page = _int_param(query, "page", 1) or 1

        def read(store: Any) -> dict[str, Any]:
            top = self.reader.latest(store)
            hi = top - (page - 1) * PAGE_SIZE
            return self.reader.blocks(store, max(1, hi - PAGE_SIZE + 1), hi, top) if hi >= 1 else {
                "chain_id": self.genesis.chain_id, "height": top, "blocks": []}

        data = await self.reader.run(read)
        pages_total = max(1, -(-data["height"] // PAGE_SIZE))
        if page > pages_total:
            raise HTTPError(404, f"page {page} is past the last page ({pages_total})")
        table = pages.blocks_table(data["blocks"], page, pages_total)
        if query.get("fragment"):
            return Response.html(table)
        return Response.html(pages.blocks_page(self.genesis.chain_id, data["height"], table, page))

    async def page_block(self, query: dict[str, str], raw: str) -> Response:
        detail = await self._block(raw)
        return Response.html(pages.block_page(self.genesis.chain_id, detail))

    async def page_participants(self, query: dict[str, str]) -> Response:
        data = await self.reader.run(self.reader.participants)
        members = await self.reader.run(self.reader.members)
        table = pages.participants_table(data["participants"]) + pages.members_tables(members)
        if query.get("fragment"):
            return Response.html(table)
        return Response.html(pages.participants_page(self.genesis.chain_id, data["height"], table))

    async def static_js(self, query: dict[str, str]) -> Response:
        return Response(200, pages.APP_JS.encode(), "text/javascript; charset=utf-8")

    async def static_css(self, query: dict[str, str]) -> Response:
        return Response(200, pages.STYLE_CSS.encode(), "text/css; charset=utf-8")

    async def prometheus(self, query: dict[str, str]) -> Response:
        if self.metrics is None:
            raise HTTPError(404, "no metrics here")
        return Response(200, self.metrics.render().encode(), self.metrics.content_type)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def metrics_only_app(metrics: Metrics) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ``metrics_listen`` endpoint: GET /metrics and nothing else."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            r = Response(405, b"read-only\n", "text/plain", [(b"allow", b"GET, HEAD")])
        elif scope["path"] != "/metrics":
            r = Response(404, b"only /metrics here\n", "text/plain")
        else:
            r = Response(200, metrics.render().encode(), metrics.content_type)
        await r.send(send, head_only=scope["method"] == "HEAD")

    return app
