"""The viewer's ``/run/RUN/read`` page: paste text, see its tokens highlighted by how strongly
explained units fire, click a token to see its units in words.

No script: each token is a link to ``#tok-N`` and CSS ``:target`` shows that token's panel,
so the page works under the viewer's CSP and with JavaScript off. Every string is escaped.
"""

from __future__ import annotations

from typing import Any

from neuroscribe.viewer import pages
from neuroscribe.viewer.pages import e, fmt, heat_class, layout, show_token

MAX_CHARS = 20_000  # a pasted text longer than this is cut (the page stays responsive)


def _panel(nav: pages.Nav, i: int, tok: dict[str, Any], safe_of: dict[str, str]) -> str:
    rows = "".join(
        f'<li><a href="{e(nav.unit(safe_of[u["hookpoint"]], u["unit"]))}">'
        f'{e(u["hookpoint"])}#{int(u["unit"])}</a> ×{fmt(u["strength"])} '
        f'(score {fmt(u["score"])}): <span class="expl">{e(u["explanation"] or "")}</span></li>'
        for u in tok["units"])
    text, _ = show_token(tok["token"])
    return (f'<div class="rpanel" id="tok-{i}"><h3>token {i}: <span class="t">{text}</span>'
            f'</h3><ul>{rows or "<li class=na>no explained unit fires here</li>"}</ul></div>')


def read_page(nav: pages.Nav, run: str, text: str, result: dict[str, Any] | None,
              safe_of: dict[str, str]) -> str:
    form = (f'<form class="readform" method="post"><textarea name="text" id="readtext" '
            f'rows="5" cols="80" aria-label="text to read">{e(text)}</textarea>'
            f'<button>read</button></form>')
    if result is None:
        return layout(nav, f"{run}: read", f"<h1>Read a text</h1>{form}", run)
    toks = []
    for i, t in enumerate(result["tokens"]):
        shown, extra = show_token(t["token"])
        peak = max((u["strength"] for u in t["units"]), default=0.0)
        cls = heat_class(min(peak, 4.0), 4.0) if t["units"] else "h0"
        toks.append(f'<a class="t {cls}{extra}" href="#tok-{i}" data-n="{len(t["units"])}">'
                    f'{shown}</a>')
    summary = "".join(
        f'<li><a href="{e(nav.unit(safe_of[u["hookpoint"]], u["unit"]))}">'
        f'{e(u["hookpoint"])}#{int(u["unit"])}</a> on {int(u["n_tokens"])} tokens: '
        f'<span class="expl">{e(u["explanation"] or "")}</span></li>'
        for u in result["summary"])
    panels = "".join(_panel(nav, i, t, safe_of) for i, t in enumerate(result["tokens"]))
    body = (f"<h1>Read a text</h1>{form}"
            f'<p class="meta">threshold: each unit\'s recorded {fmt(result["quantile"])} '
            f"quantile; click a token</p>"
            f'<div class="readtoks">{"".join(toks)}</div>{panels}'
            f'<h2>Most active units</h2><ul class="summary">'
            f'{summary or "<li class=na>none</li>"}</ul>')
    return layout(nav, f"{run}: read", body, run)
