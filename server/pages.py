"""The HTML a browser gets at ``/`` when the UI cannot be served: crash recovery, standby.

API clients keep their JSON 503 (SPEC section 4); only a request that asks for HTML
(``Accept: text/html``, as a browser's navigation does) gets a page. The page says what the
server is doing and refreshes itself (``<meta http-equiv=refresh>``), so it turns into the
dashboard once the server serves again, with no script needed. Self-contained: no network.
"""

from __future__ import annotations

import html
import time
from typing import Any

REFRESH = 2  # seconds between the page's reloads

_STYLE = """
body { margin: 0; font: 15px/1.5 system-ui, sans-serif; background: #f5f6f8; color: #1d2330; }
header { background: #1d2330; color: #fff; padding: 10px 18px; font-size: 18px; }
header b { color: #9fb8ff; }
main { max-width: 720px; margin: 40px auto; background: #fff; border: 1px solid #dde1e8;
  border-radius: 8px; padding: 22px 26px; }
h1 { font-size: 20px; margin: 0 0 10px; }
.bar { height: 10px; background: #f3dcb5; border-radius: 5px; margin: 14px 0; }
.bar div { height: 100%; background: #d9822b; border-radius: 5px; }
.muted { color: #6b7385; }
code { background: #f0f2f5; padding: 1px 4px; border-radius: 3px; }
a { color: #2f5fd0; }
"""


def wants_html(accept: str) -> bool:
    """A browser's navigation: HTML asked for, ahead of (or instead of) JSON."""
    accept = accept.lower()
    return "text/html" in accept and (
        "application/json" not in accept or accept.index("text/html") < accept.index("json")
    )


def _page(queue: str, title: str, body: str, status: str) -> bytes:
    q = html.escape(queue)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>crq · {q} · {html.escape(status)}</title><style>{_STYLE}</style></head>
<body><header>crq <b>{q}</b></header>
<main id="{html.escape(status)}"><h1>{html.escape(title)}</h1>{body}
<p class="muted">This page reloads itself every {REFRESH} s; the dashboard comes back by
itself once the server serves again.</p></main></body></html>
""".encode()


def recovery_page(queue: str, progress: dict[str, Any] | None) -> bytes:
    """Crash recovery: which taskers are back, how long the grace period still runs."""
    p = progress or {}
    if p.get("phase") == "loading":
        body = "<p>The server is loading the queue's state from its journal.</p>"
        return _page(queue, "Crash recovery: loading the state", body, "recovering")
    expected = list(p.get("expected") or [])
    back = list(p.get("reconnected") or [])
    missing = list(p.get("missing") or [n for n in expected if n not in back])
    pct = 100 * len(back) / len(expected) if expected else 100
    since = p.get("started_at")
    took = f" for {time.time() - since:.0f} s" if isinstance(since, (int, float)) else ""
    waiting = (
        f"<p>Waiting for: {', '.join(f'<code>{html.escape(n)}</code>' for n in missing)}</p>"
        if missing
        else ""
    )
    body = f"""<p>The server stopped without a clean shutdown and is recovering{took}.
Jobs keep their place in the queue and running jobs keep running; clients are refused until
the recovery ends.</p>
<p id="progress">Taskers back: <b>{len(back)} of {len(expected)}</b> expected ·
<b>{float(p.get("seconds_left") or 0):.0f} s</b> left of the grace period ·
{int(p.get("events_replayed") or 0)} journal events replayed</p>
<div class="bar"><div style="width: {pct:.0f}%"></div></div>{waiting}"""
    return _page(queue, "Crash recovery in progress", body, "recovering")


def standby_page(queue: str, leader: str | None) -> bytes:
    """A standby: where the leader is (a link), or that none serves yet."""
    if leader:
        url = html.escape(leader)
        where = f'<p>The leader is at <a id="leader" href="{url}/">{url}</a>.</p>'
    else:
        where = "<p>No leader is serving yet: an election is under way.</p>"
    body = f"""<p>This server is a <b>standby</b> of queue <code>{html.escape(queue)}</code>: it
takes over if the leader stops.</p>{where}"""
    return _page(queue, "Standby server", body, "standby")


__all__ = ["recovery_page", "standby_page", "wants_html"]
