"""HTML of the viewer's pages: plain server-rendered HTML, every string through ``html.escape``.

Corpus text is untrusted: tokens only ever become escaped element text or escaped attribute
values, never markup, URLs or styles. Heatmap colours are classes (no inline styles), so the
server can send a strict Content-Security-Policy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any, Protocol
from urllib.parse import quote, urlencode

WHITESPACE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍", "\u00a0": "⍽"}
SPECIAL = re.compile(r"<\|[^<>|]*\|>|</?s>|<(unk|pad|mask)>|\[(CLS|SEP|PAD|UNK|MASK)\]")
LEVELS = 10


def e(x: Any) -> str:
    return escape(str(x), quote=True)


class Nav(Protocol):
    """Where each page lives: the server's URLs or the static site's relative files."""

    static_site: bool

    def listing(self, sort: str, desc: bool, page: int, filters: dict[str, Any]) -> str | None: ...
    def unit(self, safe: str, unit: int) -> str | None: ...
    def search(self) -> str: ...
    def asset(self, name: str) -> str: ...
    def bench(self, name: str | None = None) -> str: ...
    def image(self, safe: str, unit: int, name: str) -> str: ...
    def home(self) -> str: ...


class ServerNav:
    static_site = False

    def __init__(self, run: str) -> None:
        self.base = f"/run/{quote(run, safe='')}"

    def listing(self, sort: str, desc: bool, page: int, filters: dict[str, Any]) -> str | None:
        q = {"sort": sort, "order": "desc" if desc else "asc", "page": page,
             **{k: v for k, v in filters.items() if v is not None}}
        return f"{self.base}/?{urlencode(q)}"

    def unit(self, safe: str, unit: int) -> str:
        return f"{self.base}/unit/{quote(safe, safe='')}/{int(unit)}"

    def search(self) -> str:
        return f"{self.base}/search"

    def asset(self, name: str) -> str:
        return f"/static/{quote(name)}"

    def bench(self, name: str | None = None) -> str:
        return f"/bench/{quote(name)}" if name else "/bench/"

    def image(self, safe: str, unit: int, name: str) -> str:
        return f"{self.base}/images/{quote(safe, safe='')}/{int(unit)}/{quote(name)}"

    def home(self) -> str:
        return "/"


STATIC_SORTS = (("score", True), ("unit", False))


class StaticNav:
    """Relative links for a page ``depth`` folders below the site's root."""

    static_site = True

    def __init__(self, depth: int = 0, units: set[tuple[str, int]] | None = None) -> None:
        self.up, self.units = "../" * depth, units  # units: those with a page (None: all)

    def listing(self, sort: str, desc: bool, page: int, filters: dict[str, Any]) -> str | None:
        if (sort, desc) not in STATIC_SORTS or any(v is not None for v in filters.values()):
            return None
        if (sort, desc, page) == (*STATIC_SORTS[0], 1):
            return f"{self.up}index.html"
        return f"{self.up}list/{sort}-{'desc' if desc else 'asc'}-{int(page)}.html"

    def unit(self, safe: str, unit: int) -> str | None:
        if self.units is not None and (safe, unit) not in self.units:
            return None
        return f"{self.up}unit/{quote(safe, safe='')}/{int(unit)}.html"

    def search(self) -> str:
        return f"{self.up}search.html"

    def asset(self, name: str) -> str:
        return f"{self.up}static/{quote(name)}"

    def bench(self, name: str | None = None) -> str:
        return f"{self.up}bench/{quote(name)}.html" if name else f"{self.up}bench/index.html"

    def image(self, safe: str, unit: int, name: str) -> str:
        return f"{self.up}images/{quote(safe, safe='')}/{int(unit)}/{quote(name)}"

    def home(self) -> str:
        return f"{self.up}index.html"


def layout(nav: Nav, title: str, body: str, run: str = "", q: str = "",
           scripts: Sequence[str] = ()) -> str:
    search = "" if not run else (
        f'<form class="search" action="{e(nav.search())}" method="get" role="search">'
        f'<input type="search" name="q" value="{e(q)}" placeholder="search explanations" '
        f'aria-label="search explanations" id="q">'
        f'<select name="mode" aria-label="search mode"><option value="text">text</option>'
        f'<option value="meaning">meaning</option></select><button>search</button></form>')
    units = f'<a href="{e(nav.home())}">units</a>' if run else ""
    js = "".join(f'<script src="{e(s)}" defer></script>' for s in scripts)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)}</title><link rel="stylesheet" href="{e(nav.asset("viewer.css"))}">'
            f'{js}</head><body><header><a class="brand" href="{e(nav.home())}">neuroscribe</a>'
            f'<span class="run">{e(run)}</span><nav>{units}'
            f'<a href="{e(nav.bench())}">benchmarks</a></nav>{search}</header>'
            f'<main>{body}</main></body></html>')


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return '<span class="na">–</span>'
    return e(f"{x:.{digits}f}") if isinstance(x, float) else e(x)


def show_token(tok: str) -> tuple[str, str]:
    """The token's visible HTML (whitespace and control characters drawn) and its classes."""
    if SPECIAL.fullmatch(tok):
        return e(tok), " sp"
    if tok == "":
        return "∅", " ws"
    parts, cls = [], ""
    for ch in tok:
        if ch in WHITESPACE:
            parts.append(f'<i>{WHITESPACE[ch]}</i>' + ("<br>" if ch == "\n" else ""))
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            parts.append(f"<i>\\x{ord(ch):02x}</i>")
        else:
            parts.append(e(ch))
    return "".join(parts), cls


def heat_class(v: float, scale: float) -> str:
    if not math.isfinite(v) or scale <= 0:
        return "h0"
    level = min(LEVELS, round(abs(v) / scale * LEVELS))
    return f"{'h' if v >= 0 else 'n'}{level}"


def heatmap(tokens: Sequence[str], values: Sequence[float], scale: float, label: str = "") -> str:
    """One record: each token a span coloured by its value; the hover shows the exact value."""
    spans = []
    for tok, v in zip(tokens, values):
        text, extra = show_token(tok)
        v = float(v)
        spans.append(f'<span class="t {heat_class(v, scale)}{extra}" data-v="{v!r}" '
                     f'title="{e(json.dumps(tok))} = {v!r}">{text}</span>')
    peak = max(values, default=0.0)
    head = f'<span class="lab">{e(label)}</span>' if label else ""
    return (f'<div class="rec">{head}<span class="max" title="max value">{peak:.3g}</span>'
            f'<span class="toks">{"".join(spans)}</span></div>')


def records_html(records: Sequence[dict[str, Any]], scale: float, cls: str) -> str:
    if not records:
        return '<p class="na">none recorded</p>'
    return f'<div class="records {e(cls)}">' + "".join(
        heatmap(r["tokens"], r["activations"], scale) for r in records) + "</div>"


def histogram_svg(edges: Sequence[float], counts: Sequence[int]) -> str:
    """Counts on a log scale, one bar per bin; each bar's hover gives its range and count."""
    if not counts:
        return ""
    w, h, n = 640, 120, len(counts)
    top = math.log1p(max(counts)) or 1.0
    bars = []
    for i, c in enumerate(counts):
        bh = h * math.log1p(c) / top
        bars.append(f'<rect x="{i * w / n:.1f}" y="{h - bh:.1f}" width="{max(w / n - 1, 1):.1f}" '
                    f'height="{bh:.1f}"><title>[{edges[i]:.4g}, {edges[i + 1]:.4g}): '
                    f'{int(c)}</title></rect>')
    return (f'<svg class="hist" viewBox="0 0 {w} {h + 16}" role="img" '
            f'aria-label="activation histogram">{"".join(bars)}'
            f'<text x="0" y="{h + 14}">{edges[0]:.3g}</text>'
            f'<text x="{w}" y="{h + 14}" text-anchor="end">{edges[-1]:.3g}</text></svg>')


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def unit_name(row: Any) -> str:
    return f"{row['hookpoint']}#{row['unit']}"


def unit_cells(nav: Nav, row: Any) -> list[str]:
    expl = (e(row["explanation"]) if row["explanation"]
            else f'<span class="na">{e(row["failure"] or "not explained")}</span>')
    url = nav.unit(row["safe"], row["unit"])
    return [f'<a href="{e(url)}">{e(unit_name(row))}</a>' if url else e(unit_name(row)),
            e(row["layer"]), e(row["kind"]), f'<span class="expl">{expl}</span>',
            fmt(row["score"]), fmt(row["score_top"]), fmt(row["score_random"]),
            fmt(row["max_act"])]


UNIT_HEADERS = ("unit", "layer", "kind", "explanation", "score", "top", "random", "max act")
SORT_OF = dict(zip(UNIT_HEADERS, ("unit", "layer", None, "explanation", "score", "score_top",
                                  "score_random", "max_act")))


def index_page(nav: Nav, run: str, idx: Any, rows: Sequence[Any], total: int, sort: str,
               desc: bool, page: int, per_page: int, filters: dict[str, Any]) -> str:
    heads = []
    for h in UNIT_HEADERS:
        key = SORT_OF[h]
        first = key not in ("unit", "layer", "explanation")  # scores start best first
        url = None if key is None else nav.listing(key, (not desc) if key == sort else first,
                                                   1, filters)
        mark = (" ▼" if desc else " ▲") if key == sort else ""
        heads.append(f'<a href="{e(url)}" data-sort="{e(key)}">{e(h)}{mark}</a>' if url
                     else f"{e(h)}{mark}")
    pages = max(1, -(-total // per_page))
    links = []
    for rel, label, p in (("first", "« first", 1), ("prev", "‹ prev", page - 1),
                          ("next", "next ›", page + 1), ("last", "last »", pages)):
        url = nav.listing(sort, desc, p, filters) if 1 <= p <= pages and p != page else None
        links.append(f'<a href="{e(url)}" rel="{rel}">{e(label)}</a>' if url
                     else f'<span class="na">{e(label)}</span>')
    pager = (f'<div class="pager">{" ".join(links[:2])} <span>page {page} of {pages} '
             f'({total:,} units)</span> {" ".join(links[2:])}</div>')
    form = "" if nav.static_site else _filter_form(idx, sort, desc, filters)
    body = (f"<h1>Units</h1>{form}{pager}"
            + table(heads, (unit_cells(nav, r) for r in rows), "units") + pager)
    return layout(nav, f"{run}: units", body, run)


def _filter_form(idx: Any, sort: str, desc: bool, f: dict[str, Any]) -> str:
    def select(name: str, values: Sequence[Any]) -> str:
        opts = "".join(f'<option value="{e(v)}"{" selected" if f.get(name) == v else ""}>'
                       f"{e(v)}</option>" for v in values)
        return (f'<label>{name} <select name="{name}"><option value="">all</option>{opts}'
                "</select></label>")

    def num(name: str, label: str) -> str:
        v = "" if f.get(name) is None else f[name]
        return (f'<label>{label} <input type="number" step="any" name="{name}" value="{e(v)}" '
                'size="6"></label>')

    return (f'<form class="filters" method="get"><input type="hidden" name="sort" '
            f'value="{e(sort)}"><input type="hidden" name="order" '
            f'value="{"desc" if desc else "asc"}">{num("min", "score ≥")}{num("max", "≤")}'
            f'{select("layer", idx.layers)}{select("kind", idx.kinds)}'
            f"<button>filter</button></form>")


def search_page(nav: Nav, run: str, q: str, mode: str, results: Sequence[tuple[Any, Any]],
                note: str = "") -> str:
    checked = {m: " checked" if m == mode else "" for m in ("text", "meaning")}
    form = (f'<form class="bigsearch" method="get" action="{e(nav.search())}">'
            f'<input type="search" name="q" value="{e(q)}" id="bigq" autofocus '
            f'aria-label="query"><label><input type="radio" name="mode" value="text"'
            f'{checked["text"]}> text</label><label><input type="radio" name="mode" '
            f'value="meaning"{checked["meaning"]}> meaning</label><button>search</button></form>')
    if note:
        out = f'<p class="note">{e(note)}</p>'
    elif not results:
        out = f'<p class="note">no unit matches {e(json.dumps(q))}</p>'
    else:
        headers = ("similarity", *UNIT_HEADERS) if mode == "meaning" else UNIT_HEADERS
        out = table(headers, (([fmt(sim)] if mode == "meaning" else []) + unit_cells(nav, r)
                              for sim, r in results), "units results")
    js = [nav.asset("search-data.js")] if nav.static_site else []
    api_url = nav.search().rsplit("/", 1)[0] + "/api/search"
    api = "" if nav.static_site else f' data-api="{e(api_url)}"'
    body = f'<h1>Search</h1>{form}<div id="results"{api}>{out}</div>'
    return layout(nav, f"{run}: search", body, run, q, [*js, nav.asset("search.js")])


def _scores_table(scores: dict[str, Any]) -> str:
    rows = [[e(k.replace("_", " ")), fmt(v.get("ev_correlation_score")),
             fmt(v.get("rsquared_score")), fmt(v.get("absolute_dev_explained_score"))]
            for k, v in sorted(scores.items())]
    return table(("split, records", "correlation", "R²", "abs. dev. explained"), rows, "num")


def unit_page(nav: Nav, run: str, row: Any, d: dict[str, Any], prev: Any, nxt: Any) -> str:
    links = " ".join(
        f'<a href="{e(nav.unit(r["safe"], r["unit"]))}" rel="{rel}">{lab} {e(unit_name(r))}</a>'
        if r is not None and nav.unit(r["safe"], r["unit"]) else f'<span class="na">{lab}</span>'
        for r, rel, lab in ((prev, "prev", "‹"), (nxt, "next", "›")))
    scale = max(row["max_act"] or 0.0, 1e-9)
    cands = table(("", "candidate explanation", "calibration correlation", "failure"),
                  (["★" if c.get("chosen") else "", e(c.get("explanation") or ""),
                    fmt(c.get("calibration_ev_correlation")), e(c.get("failure") or "")]
                   for c in d["candidates"]), "cands")
    cls = table(("scorer", "metric", "value"),
                ([e(s), e(k), fmt(v)] for s, m in sorted(d["classification"].items())
                 for k, v in sorted(m.items())), "num") if d["classification"] else ""
    stats = table(("max", "mean", "variance", "skewness", "kurtosis"),
                  [[fmt(row[k], 4) for k in ("max_act", "mean", "variance", "skewness",
                                             "kurtosis")]], "num")
    hist = histogram_svg(*d["hist"]) if d["hist"] else ""
    bins = "".join(f"<h3>quantile bin [{fmt(lo, 4)}, {fmt(hi, 4)})</h3>"
                   + records_html(recs, scale, "quantile") for lo, hi, recs in d["quantiles"])
    sim_scale = max((max(s["simulated"], default=0) for s in d["simulations"]), default=0)
    sims = "".join(
        f'<div class="pair">{heatmap(s["tokens"], s["real"], scale, "real")}'
        f'{heatmap(s["tokens"], s["simulated"], max(sim_scale, 1e-9), "simulated")}</div>'
        for s in d["simulations"]) or '<p class="na">not scored</p>'
    imgs = "".join(f'<img src="{e(nav.image(row["safe"], row["unit"], n))}" alt="{e(n)}">'
                   for n in d["images"])
    failure = d["score_failure"] or row["failure"]
    body = (f'<div class="unitnav">{links}</div><h1>{e(unit_name(row))}</h1>'
            f'<p class="meta">{e(row["kind"])} · layer {e(row["layer"])} · '
            f'explainer {e(row["explainer"] or "–")}</p>'
            f'<p class="best">{e(row["explanation"] or "not explained")}</p>'
            + (f'<p class="fail">{e(failure)}</p>' if failure else "")
            + f'<div class="cols"><section><h2>Scores</h2>{_scores_table(d["scores"])}{cls}'
            f"</section><section><h2>Activations</h2>{stats}{hist}</section></div>"
            f"<h2>Explanations</h2>{cands}" + _output_tokens(d.get("output_tokens"))
            + (f'<h2>Images</h2><div class="imgs">{imgs}</div>' if imgs else "")
            + f'<h2>Top exemplars</h2>{records_html(d["top"], scale, "top")}'
            f"<h2>Quantile-bin samples</h2>{bins or '<p class=na>none recorded</p>'}"
            f'<h2>Random samples</h2>{records_html(d["random"], scale, "random")}'
            f'<h2>Simulated vs real (valid split)</h2><div class="sims">{sims}</div>')
    return layout(nav, f"{run}: {unit_name(row)}", body, run)


def _output_tokens(lens: dict[str, Any] | None) -> str:
    """The unit's direct effect on the vocabulary (logit lens), if the run has it."""
    if not lens:
        return ""
    side = [" ".join(f'<span class="t" title="{v!r}">{show_token(t)[0]}</span>' for t, v in
                     lens[k]) for k in ("promoted", "suppressed")]
    return (f'<h2>Output tokens (logit lens)</h2><p class="otoks">promoted: {side[0]}</p>'
            f'<p class="otoks">suppressed: {side[1]}</p>')


def message_page(nav: Nav, title: str, text: str, run: str = "") -> str:
    return layout(nav, title, f'<h1>{e(title)}</h1><p class="note">{e(text)}</p>', run)


def runs_page(nav: Nav, runs: Sequence[tuple[str, str | None, int]]) -> str:
    rows = ([f'<a href="/run/{e(quote(name, safe=""))}/">{e(name)}</a>',
             e(problem or f"{n:,} units")] for name, problem, n in runs)
    return layout(nav, "runs", "<h1>Runs</h1>" + table(("run", "status"), rows))


def json_html(x: Any, depth: int = 0) -> str:
    """Any JSON report as nested tables: dicts of dicts with shared keys become one matrix."""
    if isinstance(x, dict):
        if not x:
            return '<span class="na">{}</span>'
        vals = list(x.values())
        if depth < 6 and all(isinstance(v, dict) for v in vals):
            cols = list(dict.fromkeys(k for v in vals for k in v))
            if len(cols) <= 12 and all(not isinstance(w, (dict, list)) or len(str(w)) < 80
                                       for v in vals for w in v.values()):
                return table(["", *map(e, cols)], ([e(k), *(json_html(v.get(c), depth + 1)
                                                         for c in cols)] for k, v in x.items()),
                             "json")
        return table(("key", "value"), ([e(k), json_html(v, depth + 1)] for k, v in x.items()),
                     "json")
    if isinstance(x, list):
        if x and all(isinstance(v, dict) for v in x):
            cols = list(dict.fromkeys(k for v in x[:200] for k in v))[:16]
            rows = ([json_html(v.get(c), depth + 1) for c in cols] for v in x[:200])
            return table([e(c) for c in cols], rows, "json") + (
                f'<p class="na">first 200 of {len(x)}</p>' if len(x) > 200 else "")
        shown = ", ".join(json_html(v, depth + 1) for v in x[:50])
        return f"[{shown}{', …' if len(x) > 50 else ''}]"
    if isinstance(x, float):
        return fmt(x, 4)
    return '<span class="na">–</span>' if x is None else e(x)


def bench_page(nav: Nav, name: str, report: Any, image: str | None) -> str:
    img = f'<img class="plot" src="{e(image)}" alt="{e(name)} plot">' if image else ""
    return layout(nav, f"benchmark {name}", f"<h1>{e(name)}</h1>{img}{json_html(report)}")


def bench_index(nav: Nav, names: Sequence[tuple[str, str]]) -> str:
    rows = ([f'<a href="{e(nav.bench(n))}">{e(n)}</a>', e(src)] for n, src in names)
    body = (table(("report", "from"), rows) if names else
            '<p class="note">no benchmark reports (replicate-*.json, find*.json, planted*.json) '
            "in the runs or the bench folder</p>")
    return layout(nav, "benchmarks", f"<h1>Benchmarks</h1>{body}")
