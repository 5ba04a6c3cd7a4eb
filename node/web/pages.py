"""Server-rendered HTML and SVG for the explorer. Every value from the chain is escaped; no inline script or style
(the Content-Security-Policy forbids both), so the page's only code is /static/app.js."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any


def _e(v: Any) -> str:
    return escape("" if v is None else str(v), quote=True)


def _num(v: Any, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def layout(title: str, chain_id: str, body: str, *, active: str, height: int) -> str:
    nav = "".join(
        f'<a href="{href}"{" class=active" if key == active else ""}>{label}</a>'
        for key, href, label in (("overview", "/", "Overview"), ("blocks", "/blocks", "Blocks"),
                                 ("participants", "/participants", "Participants"))
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} · {_e(chain_id)}</title>"
        '<link rel=stylesheet href="/static/style.css"><script src="/static/app.js" defer></script></head>'
        f'<body data-height="{height}"><header><span class=brand>flnode</span>'
        f'<span class=chain>{_e(chain_id)}</span><nav>{nav}</nav>'
        '<span id=live class="live off" title="polls /api/status every second">connecting</span></header>'
        f"<main>{body}</main>"
        "<footer>read-only view of this node's chain store · JSON: "
        '<a href="/api/status">/api/status</a> <a href="/api/blocks">/api/blocks</a> '
        '<a href="/api/participants">/api/participants</a> <a href="/metrics">/metrics</a></footer>'
        "</body></html>"
    )


def error_page(chain_id: str, status: int, message: str) -> str:
    return layout(str(status), chain_id, f"<h1>{status}</h1><p>{_e(message)}</p>", active="", height=0)


# ---------------------------------------------------------------- charts


def line_chart(
    chart_id: str, title: str, xs: Sequence[int], ys: Sequence[float | None], *, color: str, fmt: str,
    y_min: float | None = None, y_max: float | None = None, width: int = 420, height: int = 170,
) -> str:
    """An SVG line chart of ys over xs (None = no point), with its y range and last value labelled."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    head = f'<figure class=chart><figcaption>{_e(title)}</figcaption>'
    if len(pts) < 1:
        return head + f'<svg id="{chart_id}" class=empty viewBox="0 0 {width} {height}" role=img>' \
                      '<text x="12" y="24" fill="#666">no data yet</text></svg></figure>'
    left, right, top, bottom = 48, 12, 10, 22
    x0, x1 = pts[0][0], pts[-1][0]
    lo = min(p[1] for p in pts) if y_min is None else y_min
    hi = max(p[1] for p in pts) if y_max is None else y_max
    if hi - lo < 1e-12:
        hi, lo = hi + 0.5 * (abs(hi) or 1), lo - 0.5 * (abs(lo) or 1)
        lo = max(lo, 0.0) if y_min is None and pts[0][1] >= 0 else lo

    def sx(x: float) -> float:
        return left + (x - x0) / max(1, x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (hi - y) / (hi - lo) * (height - top - bottom)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    last_x, last_y = pts[-1]
    grid = "".join(
        f'<line x1="{left}" x2="{width - right}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#e3e3e3"/>'
        f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end" font-size="11" fill="#555">'
        f"{format(v, fmt)}</text>"
        for v in (lo, (lo + hi) / 2, hi)
    )
    return head + (
        f'<svg id="{chart_id}" viewBox="0 0 {width} {height}" role=img '
        f'aria-label="{_e(title)}" data-points="{len(pts)}">{grid}'
        f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{line}"/>'
        f'<circle cx="{sx(last_x):.1f}" cy="{sy(last_y):.1f}" r="3" fill="{color}"/>'
        f'<text x="{left}" y="{height - 6}" font-size="11" fill="#555">height {x0}</text>'
        f'<text x="{width - right}" y="{height - 6}" font-size="11" fill="#555" text-anchor="end">'
        f"height {x1}: {format(last_y, fmt)}</text></svg></figure>"
    )


# ---------------------------------------------------------------- overview


def _stat(label: str, field: str, value: str, fmt: str = "") -> str:
    return (f'<div class=stat><div class=label>{_e(label)}</div>'
            f'<div class=value data-field="{field}" data-format="{fmt}">{value}</div></div>')


def overview(status: dict[str, Any], live_html: str) -> str:
    s = status
    online = "–" if s.get("validators_online") is None else f"{s['validators_online']}"
    cards = "".join((
        _stat("chain", "chain_id", _e(s["chain_id"])),
        _stat("height", "height", _e(s["height"])),
        _stat("round time", "round_time_s", _num(s.get("round_time_s"), ".3f") + " s", "seconds"),
        _stat("test accuracy", "test_accuracy", _num(s.get("test_accuracy"), ".3f"), "fixed3"),
        _stat("peers", "peers", _e(s.get("peers", "–") if s.get("peers") is not None else "–")),
        '<div class=stat><div class=label>validators online</div><div class=value>'
        f'<span data-field="validators_online">{online}</span> / <span data-field="validators">'
        f'{_e(s["validators"])}</span></div></div>',
        _stat("model hash", "model_hash", _e((s.get("model_hash") or "–")[:16]), "hash16"),
    ))
    task = f"{_e(s['model'])} on {_e(s['dataset'])}, aggregator {_e(s['aggregator'])}"
    halted = f'<p class=halted data-field="halted">{_e(s["halted"])}</p>' if s.get("halted") else ""
    body = (f"<h1>Overview</h1><p class=sub>{task}</p>{halted}<section class=stats>{cards}</section>"
            f'<section id=overview-live data-live="overview">{live_html}</section>')
    return layout("Overview", s["chain_id"], body, active="overview", height=s["height"])


def overview_live(series: dict[str, Any], recent: list[dict[str, Any]]) -> str:
    xs = series["heights"]
    charts = (
        line_chart("chart-accuracy", "test accuracy per height", xs, series["test_accuracy"], color="#1f77b4",
                   fmt=".3f")
        + line_chart("chart-loss", "test loss per height", xs, series["test_loss"], color="#d62728", fmt=".3f")
        + line_chart("chart-round-time", "round time per height (s)", xs, series["round_time_s"], color="#2ca02c",
                     fmt=".3f", y_min=0.0)
    )
    return (f"<div class=charts>{charts}</div><h2>Latest blocks</h2>"
            + blocks_rows_table(list(reversed(recent))))


# ---------------------------------------------------------------- blocks


def blocks_rows_table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("height", "round", "proposer", "accepted", "rejected", "test acc",
                                                "round s", "rewards", "model", "slashed"))
    body = "".join(
        f'<tr data-height="{r["height"]}"><td><a href="/blocks/{r["height"]}">{r["height"]}</a></td>'
        f'<td>{_e(r["round"])}</td><td>{_e(r["proposer"])}</td><td>{r["accepted"]}</td><td>{r["rejected"]}</td>'
        f'<td>{_num(r["test_accuracy"], ".3f")}</td><td>{_num(r["round_time_s"], ".3f")}</td>'
        f'<td>{r["rewards"]}</td><td class=hash>{_e(r["model_hash"][:12])}</td>'
        f'<td>{_e(", ".join(x["validator"] for x in r["slashed"]))}</td></tr>'
        for r in rows
    )
    return f"<table class=blocks><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def blocks_table(rows: list[dict[str, Any]], page: int, pages: int) -> str:
    prev = f'<a rel=prev href="/blocks?page={page - 1}">← newer</a>' if page > 1 else "<span></span>"
    nxt = f'<a rel=next href="/blocks?page={page + 1}">older →</a>' if page < pages else "<span></span>"
    pager = f"<div class=pager>{prev}<span>page {page} of {pages}</span>{nxt}</div>"
    return pager + blocks_rows_table(list(reversed(rows))) + pager


def blocks_page(chain_id: str, height: int, table: str, page: int) -> str:
    live = ' data-live="blocks"' if page == 1 else ""  # older pages do not move
    body = f"<h1>Blocks</h1><section id=blocks-live{live}>{table}</section>"
    return layout("Blocks", chain_id, body, active="blocks", height=height)


def block_page(chain_id: str, d: dict[str, Any]) -> str:
    h = d["height"]
    facts = [
        ("block hash", f'<span class=hash>{_e(d["block_hash"])}</span>'),
        ("previous block", f'<span class=hash>{_e(d["prev_block_hash"])}</span>'),
        ("round", _e(d["round"])),
        ("proposer", _e(d["proposer"])),
        ("certificate signers", _e(", ".join(d["signers"])) + f' <span class=muted>({len(d["signers"])})</span>'),
        ("aggregator", _e(d["aggregator"])),
        ("model hash", f'<span class=hash>{_e(d["model_hash"])}</span>'),
        ("app hash", f'<span class=hash>{_e(d["app_hash"])}</span>'),
        ("test accuracy", _num(d["test_accuracy"], ".4f")),
        ("round time", _num(d["round_time_s"], ".3f") + " s"),
        ("evidence", (f'{d["evidence"]}: ' + _e(", ".join(d["evidence_validators"]))) if d["evidence"] else "none"),
    ]
    t = d.get("trainer")
    if t is not None:  # this node's own client at this height: its fit, or the error that cost the round
        facts.append(("this node's training", f'<span class=bad>{_e(t["error_kind"])}: {_e(t["error"])}</span>'
                      if "error" in t else _e(", ".join(f"{k} {v:.4g}" if isinstance(v, int | float) else f"{k} {v}"
                                                       for k, v in (t.get("metrics") or {}).items()))
                      + (f' <span class=muted>({t["fit_s"]:.2f} s)</span>' if t.get("fit_s") is not None else "")))
    for tx in d.get("membership") or []:
        facts.append(("membership", f'{_e(tx["what"])} <span class=muted>(from height {h + 2})</span>'))
    for sl in d["slashed"]:
        facts.append(("slashed", f'{_e(sl["validator"])}: no voting power from height {sl["from_height"]}'))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    ups = "".join(
        f'<tr class="update {"ok" if u["outcome"] == "accepted" else "bad"}"><td>{_e(u["author"])}</td>'
        f'<td>{u["samples"]}</td><td>{u["local_loss"]:.4f}</td><td>{_num(u.get("local_accuracy"), ".4f")}</td>'
        f'<td>{_e(u["outcome"])}</td>'
        f'<td>{u["reward"]}</td><td>{u["penalty"]}</td></tr>'
        for u in d["updates"]
    )
    dp = {q["name"]: q for q in d.get("privacy") or []}
    parts = "".join(
        f'<tr><td>{_e(p["name"])}</td><td>{p["balance"]}</td><td>{p["reputation"]}</td>'
        f'<td>{"yes" if p["excluded"] else ""}</td><td>{_e(p["slashed_from"] or "")}</td>'
        f'<td>{_eps(dp.get(p["name"], {}))}</td></tr>'
        for p in d["participants"]
    )
    nav = (f'<div class=pager>{f"<a href=/blocks/{h - 1}>← {h - 1}</a>" if h > 1 else "<span></span>"}'
           f'<a href="/api/blocks/{h}">JSON</a><a href="/blocks/{h + 1}">{h + 1} →</a></div>')
    body = (
        f"<h1>Block {h}</h1>{nav}<dl class=facts>{dl}</dl>"
        f"<h2>Updates ({len(d['updates'])})</h2>"
        "<table id=updates><thead><tr><th>author</th><th>samples</th><th>local loss</th><th>local accuracy</th>"
        "<th>outcome</th>"
        f"<th>reward</th><th>penalty</th></tr></thead><tbody>{ups}</tbody></table>"
        "<h2>Participants after this block</h2><table><thead><tr><th>participant</th><th>balance</th>"
        f"<th>reputation</th><th>excluded</th><th>slashed from</th><th>ε spent</th></tr></thead><tbody>{parts}</tbody>"
        "</table>"
        "<h2>Verify it yourself</h2><p>This page shows what this node stored. Replay the whole chain from genesis "
        "(every signature, certificate and hash, re-executing the aggregation) on any node's home:</p>"
        "<pre class=verify>flnode chain verify --home &lt;node home&gt;\n"
        f"flnode chain show --home &lt;node home&gt; --height {h} --json</pre>"
    )
    return layout(f"Block {h}", chain_id, body, active="blocks", height=h)


# ---------------------------------------------------------------- participants


def participants_table(rows: list[dict[str, Any]]) -> str:
    body = "".join(
        f'<tr data-name="{_e(p["name"])}"><td>{_e(p["name"])}</td><td>{p["balance"]}</td><td>{p["reputation"]}</td>'
        f'<td>{"yes" if p["excluded"] else ""}</td><td>{p["accepted"]}</td><td>{p["rejected"]}</td>'
        f'<td>{_e(p["slashed_from"] or "")}</td><td>{_eps(p)}</td><td class=hash>{_e(p["public_key"][:16])}</td></tr>'
        for p in rows
    )
    return ("<table id=participants><thead><tr><th>participant</th><th>balance</th><th>reputation</th>"
            "<th>excluded</th><th>updates accepted</th><th>updates rejected</th><th>slashed from</th>"
            f"<th>ε spent</th><th>public key</th></tr></thead><tbody>{body}</tbody></table>")


def _eps(p: dict[str, Any]) -> str:
    if p.get("epsilon_spent") is None:
        return "–"  # no differential privacy on this chain
    budget = p.get("epsilon_budget")
    return f'{p["epsilon_spent"]:.3f}' + ("" if budget is None else f" of {budget:g}")


def members_tables(m: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr><td>{_e(r["name"])}</td><td>{_e(r["role"])}</td><td>{r["power"]}</td>'
        f'<td>{"genesis" if r["genesis"] else r["since"]}</td><td>{_e(r["ended"] or "")}</td>'
        f'<td>{"yes" if r["in_force"] else "no"}</td></tr>'
        for r in m["members"]
    )
    out = ("<h2>Members</h2><table id=members><thead><tr><th>member</th><th>role</th><th>voting power</th>"
           f"<th>since height</th><th>ended at</th><th>in force</th></tr></thead><tbody>{rows}</tbody></table>")
    pending = [(r["what"], r["votes"], r["opened"]) for r in m["requests"]]
    pending += [(f"remove {r['target']}", r["votes"], r["opened"]) for r in m["removals"]]
    if pending:
        out += ("<h2>Being voted on</h2><table><thead><tr><th>transaction</th><th>votes</th><th>opened at</th>"
                "</tr></thead><tbody>" + "".join(f"<tr><td>{_e(w)}</td><td>{v}</td><td>{o}</td></tr>"
                                                 for w, v, o in pending) + "</tbody></table>")
    return out


def participants_page(chain_id: str, height: int, table: str) -> str:
    body = (f"<h1>Participants</h1><p class=sub>after height <span data-field=height>{height}</span></p>"
            f'<section id=participants-live data-live="participants">{table}</section>')
    return layout("Participants", chain_id, body, active="participants", height=height)


# ---------------------------------------------------------------- static

APP_JS = r"""// Live refresh, one request a second: /api/live returns the status (shown in every [data-field]) and, when
// the height moved, the page's [data-live] section re-rendered by the server. No framework, no build step.
(function () {
  "use strict";
  var section = document.querySelector("[data-live]");
  var view = section ? section.dataset.live : "";
  var height = section ? Number(document.body.dataset.height || 0) : -1;
  var badge = document.getElementById("live");
  function fmt(kind, v) {
    if (v === null || v === undefined) return "–";
    if (kind === "seconds") return Number(v).toFixed(3) + " s";
    if (kind === "fixed3") return Number(v).toFixed(3);
    if (kind === "hash16") return String(v).slice(0, 16);
    return String(v);
  }
  function state(ok, text) {
    if (!badge) return;
    badge.textContent = text;
    badge.className = ok ? "live on" : "live off";
  }
  var timer = null, busy = false;
  async function tick() {
    if (busy) return;  // one poll at a time: the running one schedules the next
    busy = true;
    clearTimeout(timer);
    try {
      var url = view ? "/api/live?view=" + view + "&height=" + height : "/api/status";
      var r = await fetch(url, {cache: "no-store"});
      if (!r.ok) throw new Error("HTTP " + r.status);
      var body = await r.json();
      var s = view ? body.status : body;
      document.querySelectorAll("[data-field]").forEach(function (el) {
        if (el.dataset.field in s) el.textContent = fmt(el.dataset.format, s[el.dataset.field]);
      });
      state(true, "live · height " + s.height);
      if (view && body.html !== null) {
        section.innerHTML = body.html;
        height = s.height;
        document.body.dataset.height = String(height);
      }
    } catch (e) {
      state(false, "offline");
    }
    busy = false;
    timer = setTimeout(tick, document.hidden ? 10000 : 1000);  // a background tab costs the node a tenth
  }
  document.addEventListener("visibilitychange", function () { if (!document.hidden) tick(); });
  tick();
})();
"""

STYLE_CSS = """
:root { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; background: #f6f7f9; }
body { margin: 0; }
header { display: flex; gap: 16px; align-items: center; padding: 10px 20px; background: #14213d; color: #fff; }
header a { color: #cfd8ea; text-decoration: none; margin-right: 14px; }
header a.active, header a:hover { color: #fff; text-decoration: underline; }
.brand { font-weight: 700; } .chain { font-family: ui-monospace, monospace; opacity: .8; }
nav { flex: 1; }
.live { font-size: 12px; padding: 2px 8px; border-radius: 10px; }
.live.on { background: #2a9d8f; } .live.off { background: #a33; }
main { padding: 12px 20px; max-width: 1240px; }
h1 { margin: 8px 0 4px; font-size: 22px; } h2 { font-size: 17px; margin: 18px 0 6px; }
.sub, .muted { color: #666; }
.stats { display: flex; flex-wrap: wrap; gap: 10px; }
.stat { flex: 1 1 auto; min-width: 110px; } .stat .value { white-space: nowrap; }
.stat { background: #fff; border: 1px solid #e1e4e8; border-radius: 6px; padding: 8px 12px; }
.stat .label { font-size: 12px; color: #666; } .stat .value { font-size: 20px; font-weight: 600; }
.stat .value[data-format=hash16] { font-family: ui-monospace, monospace; font-size: 15px; padding-top: 4px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 10px; margin-top: 12px; }
.charts svg { width: 100%; height: auto; display: block; }
figure.chart { margin: 0; background: #fff; border: 1px solid #e1e4e8; border-radius: 6px; padding: 6px; }
figcaption { font-size: 13px; color: #444; padding: 0 0 2px 4px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { border: 1px solid #e1e4e8; padding: 3px 8px; text-align: right; }
th { background: #eef1f5; } td:first-child, th:first-child { text-align: left; }
table.blocks td:first-child { text-align: right; } table.blocks td:nth-child(3) { text-align: left; }
tr.update.bad { background: #fdecec; } .bad { color: #a33; }
.hash { font-family: ui-monospace, monospace; font-size: 12px; }
.pager { display: flex; gap: 16px; margin: 8px 0; }
dl.facts { display: grid; grid-template-columns: 180px 1fr; gap: 2px 12px; }
dt { color: #666; } dd { margin: 0; word-break: break-all; }
pre.verify { background: #14213d; color: #e6e6e6; padding: 10px; border-radius: 6px; }
.halted { background: #fdecec; color: #a33; padding: 6px 10px; }
footer { color: #777; font-size: 12px; padding: 16px 20px; }
footer a { margin-right: 8px; }
"""
