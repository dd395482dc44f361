"""The web viewer without a browser: routes, 404s, path traversal, escaping, bad input, export.

The run is made by the real pipeline (record -> explain -> score) on a tiny random GPT-2 whose
tokenizer holds hostile strings as single tokens, so the pages must show them as text.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import neuroscribe.cli as cli
import neuroscribe.viewer.pages as pages
from neuroscribe.errors import UserError
from neuroscribe.viewer.export import export_html
from neuroscribe.viewer.server import (
    ExportConfig,
    ServeConfig,
    Site,
    ViewerConfig,
    make_server,
    respond,
)

HP0 = "transformer.h.0.mlp.act"
HOSTILE = ("<script>alert(1)</script>", '"><img/src=x/onerror=alert(2)>', "javascript:alert(3)",
           "&amp;", "<b>bold</b>")
SENTENCE = ("the cat sat on a mat while red birds sang about green hills and the king said that "
            "seven blue ships came over the sea in May with gold and salt")
WORDS = SENTENCE.split()


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    lines = []
    for i in range(300):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
        if i % 3 == 0:
            words.insert(rng.randint(0, len(words)), HOSTILE[i // 3 % len(HOSTILE)])
        lines.append(" ".join(words) + ("\t." if i % 7 == 0 else "."))
    path.write_text("\n".join(lines) + "\n")
    return path


def _tiny_model(out: Path, corpus: Path) -> Path:
    """A 2-layer GPT-2 whose tokenizer keeps each hostile string as one token."""
    from conftest import build_tiny_gpt2

    return build_tiny_gpt2(out, corpus, HOSTILE, n_positions=64)


def make_viewer_run(base: Path) -> Path:
    """A scored run of 2 hookpoints x 64 units (6 explained per hookpoint), made once per
    pytest session and shared by the viewer's test files."""
    run = base / "viewer-run"
    if (run / "index.sqlite").exists():
        return run
    corpus = _corpus(base / "hostile.txt")
    model = _tiny_model(base / "hostile-gpt2", corpus)
    argv = ["run", "--out", str(run), "--model", str(model), "--corpus", str(corpus),
            "--hookpoints", "transformer.h.*.mlp.act", "--max-tokens", "3000", "--ctx-len", "24",
            "--batch-size", "16", "--quantile-warmup", "8", "--n-top", "12", "--n-random", "9",
            "--n-quantile", "2", "--units", "first:6", "--simulator", "tokens"]
    assert cli.main(argv) == 0
    return run


@pytest.fixture(scope="session")
def viewer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_viewer_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def site(viewer_run: Path) -> Site:
    return Site([viewer_run], ViewerConfig(bench=str(viewer_run / "no-bench")))


def get(site: Site, url: str) -> tuple[int, str]:
    status, _, body, _ = respond(site, url)
    return status, body.decode("utf-8")


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text inside each ``span.t``."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, Any]]] = []
        self.tokens: list[tuple[str, float, str]] = []  # (title, data-v, text)
        self._open: list[Any] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "span" and "data-v" in a:
            self._open.append([a["title"], float(a["data-v"]), ""])
        elif self._open and tag == "br":
            self._open[-1][2] += "\n"

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1][2] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._open:
            self.tokens.append(tuple(self._open.pop()))


def column(html: str, i: int) -> list[str]:
    """The cells of column ``i`` of the page's first table body."""
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [re.findall(r"<td>(.*?)</td>", row)[i] for row in body.split("<tr>")[1:]]


def parse(html: str) -> Tags:
    p = Tags()
    p.feed(html)
    return p


def test_index_lists_every_unit_sorted_and_paginated(site: Site, viewer_run: Path) -> None:
    db = sqlite3.connect(viewer_run / "index.sqlite")
    n_units = db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
    scores = sorted((r[0] for r in db.execute(
        "SELECT ev_correlation FROM scores WHERE split='valid' AND variant='all' AND "
        "ev_correlation IS NOT NULL")), reverse=True)
    status, html = get(site, "/run/viewer-run/?sort=score&order=desc&page=1")
    assert status == 200 and f"({n_units:,} units)" in html
    shown = column(html, 4)
    assert shown[:len(scores)] == [f"{s:.3f}" for s in scores]  # best first
    assert set(shown[len(scores):]) == {'<span class="na">–</span>'}  # unscored units last
    pages_total = -(-n_units // 50)
    assert f"page 1 of {pages_total}" in html
    status, last = get(site, f"/run/viewer-run/?sort=unit&order=asc&page={pages_total}")
    links = re.findall(r'href="/run/viewer-run/unit/([^"/]+)/(\d+)"', last)
    assert links[-1] == ("transformer.h.1.mlp.act", str(n_units // 2 - 1))
    _, flt = get(site, f"/run/viewer-run/?min={scores[1]}&layer=0")
    assert "units)" in flt and len(re.findall(r"/unit/", flt)) <= 2


def test_unit_page_shows_records_exactly(site: Site, viewer_run: Path) -> None:
    from neuroscribe.record.core import RecordStore

    nr = RecordStore(viewer_run).neuron_record(HP0, 2)
    status, html = get(site, f"/run/viewer-run/unit/{HP0}/2")
    assert status == 200
    tokens = parse(html).tokens
    top = [t for r in nr.most_positive_activation_records for t in zip(r.tokens, r.activations)]
    assert [(json.loads(title.rsplit(" = ", 1)[0]), v) for title, v, _ in tokens[:len(top)]] \
        == top
    assert 'rel="prev"' in html and 'rel="next"' in html
    for section in ("Explanations", "Scores", "Top exemplars", "Quantile-bin samples",
                    "Random samples", "Simulated vs real", "<svg class=\"hist\""):
        assert section in html


def test_hostile_tokens_are_text(site: Site, viewer_run: Path) -> None:
    seen = set()
    for unit in range(6):
        _, html = get(site, f"/run/viewer-run/unit/{HP0}/{unit}")
        p = parse(html)
        assert not [t for t, a in p.tags if t in ("img", "b") or (t == "script" and
                    not a.get("src", "").startswith("/static/"))]
        assert not [a for _, a in p.tags if any(k.startswith("on") for k in a)
                    or str(a.get("href", "")).startswith("javascript:")]
        seen |= {text for _, _, text in p.tokens if text in HOSTILE}
    assert seen == set(HOSTILE)


@pytest.mark.parametrize("url", ["/run/viewer-run/../index.sqlite", "/run/%2e%2e/etc/passwd",
                                 "/static/..%2fviewer.py", "/run/viewer-run/images/..%5c..%5cx",
                                 "/static/%2e%2e%2f%2e%2e%2fcli.py"])
def test_path_traversal_refused(site: Site, url: str) -> None:
    status, html = get(site, url)
    assert status == 403 and "Refused" in html


@pytest.mark.parametrize("url", ["/run/viewer-run/unit/transformer.h.0.mlp.act/99999",
                                 "/run/viewer-run/unit/nope/1", "/run/viewer-run/unit/x/-1",
                                 "/run/other/", "/nothing", "/static/secret.txt",
                                 "/bench/missing", "/run/viewer-run/images/a/1/b.png"])
def test_missing_things_are_404_pages(site: Site, url: str) -> None:
    status, html = get(site, url)
    assert status == 404 and "<h1>Not found</h1>" in html and "Traceback" not in html


def test_search_text_meaning_and_empty(site: Site) -> None:
    row = site.runs["viewer-run"].idx.page("score", True, 1, 1)[0][0]
    word = re.findall(r'"(\w+)"', row["explanation"])[0]
    _, html = get(site, f"/run/viewer-run/search?q={word}&mode=text")
    hits = re.findall(r'/unit/[^"]+', html)
    assert hits and all(word.lower() in r["explanation"].lower() for r in _rows(site, hits))
    assert (row["safe"], row["unit"]) in [(r["safe"], r["unit"]) for r in _rows(site, hits)]
    _, html = get(site, f"/run/viewer-run/search?q={row['explanation']}&mode=meaning")
    sims = [float(x) for x in re.findall(r"<tr><td>(-?\d\.\d{3})</td>", html)]
    assert sims == sorted(sims, reverse=True) and sims[0] > 0.99
    assert f"/unit/{row['safe']}/{row['unit']}\"" in html.split("</tr>")[1]
    status, html = get(site, "/run/viewer-run/search?q=&mode=text")
    assert status == 200 and "type a few words" in html
    data = json.loads(respond(site, "/run/viewer-run/api/search?q=%22%3C%2A")[2])
    assert data["results"] == [] and data["note"] == ""


def _rows(site: Site, hits: list[str]) -> list[Any]:
    idx = site.runs["viewer-run"].idx
    return [idx.unit(h.split("/")[2], int(h.split("/")[3])) for h in hits]


def test_escaping_of_explanations_and_json() -> None:
    row = {"hookpoint": "h<i>", "unit": 1, "safe": "h", "layer": 0, "kind": "neuron",
           "explanation": '<script>alert("x")</script> & "q"', "failure": None, "score": 0.5,
           "score_top": None, "score_random": None, "max_act": 1.0}
    cells = "".join(pages.unit_cells(pages.ServerNav("r"), row))
    assert "<script>" not in cells and "&lt;script&gt;alert(&quot;x&quot;)" in cells
    assert "<i>" not in cells
    assert "<img" not in pages.json_html({"<img src=x>": ["<img src=y>", {"a": "<b>"}]})
    text, cls = pages.show_token(" \n\t\x01<|x|>")
    assert text.count("<i>") == 4 and "\\x01" in text and "&lt;|x|&gt;" in text and cls == ""
    assert pages.show_token("<|endoftext|>") == ("&lt;|endoftext|&gt;", " sp")


def test_bad_runs(tmp_path: Path, viewer_run: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        Site([tmp_path / "missing"], ViewerConfig())
    half = tmp_path / "half"
    half.mkdir()
    (half / "record.json").write_text(json.dumps({"complete": False}))
    site = Site([half, viewer_run], ViewerConfig(bench=str(tmp_path)))
    status, html = get(site, "/")
    assert status == 200 and "has not finished" in html and "viewer-run" in html
    status, html = get(site, "/run/half/")
    assert status == 404 and "cannot be shown" in html
    shutil.copytree(viewer_run, half, dirs_exist_ok=True)  # the run finishes while served
    status, html = get(site, "/run/half/")
    assert status == 200 and "<h1>Units</h1>" in html
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    unscored = tmp_path / "unscored"  # explained, the score stage not begun: no index yet
    shutil.copytree(viewer_run, unscored, ignore=shutil.ignore_patterns(
        "index.sqlite", "viewer.sqlite", "scores", "score.json"))
    site = Site([unscored], ViewerConfig(bench=str(tmp_path), embed=False))
    status, html = get(site, "/run/unscored/")
    assert status == 200 and column(html, 3)[0].startswith('<span class="expl">fires on')
    assert set(column(html, 4)) == {'<span class="na">–</span>'}
    status, html = get(site, f"/run/unscored/unit/{HP0}/0")
    assert status == 200 and "not scored" in html
    status, html = get(site, "/run/unscored/search?q=cat&mode=meaning")
    assert status == 200 and "needs the explanations&#x27; embeddings" in html


def test_bench_pages(tmp_path: Path, viewer_run: Path) -> None:
    report = {"distribution": {"valid_all": {"neurons": {"mean": 0.46}, "features": {
        "mean": 0.70}}}, "name": "<b>x</b>"}
    (tmp_path / "replicate-toy.json").write_text(json.dumps(report))
    (tmp_path / "planted.json").write_text(json.dumps([{"unit": 1, "hit": True}]))
    site = Site([viewer_run], ViewerConfig(bench=str(tmp_path)))
    _, html = get(site, "/bench/")
    assert "replicate-toy" in html and "planted" in html
    status, html = get(site, "/bench/replicate-toy")
    assert status == 200 and "0.4600" in html and "0.7000" in html and "<b>" not in html


def test_images_served_only_from_the_run(tmp_path: Path, viewer_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(viewer_run, run)
    img = run / "images" / HP0 / "3"
    img.mkdir(parents=True)
    (img / "top-0.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (img / "link.png").symlink_to(viewer_run / "index.sqlite")
    site = Site([run], ViewerConfig(bench=str(tmp_path)))
    _, html = get(site, f"/run/run/unit/{HP0}/3")
    assert f'src="/run/run/images/{HP0}/3/top-0.png"' in html
    status, _, body, _ = respond(site, f"/run/run/images/{HP0}/3/top-0.png")
    assert status == 200 and body.startswith(b"\x89PNG")
    assert respond(site, f"/run/run/images/{HP0}/3/link.png")[0] == 403


@pytest.fixture()
def server(site: Site) -> Iterator[tuple[str, int]]:
    srv = make_server(site, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[:2]
    srv.shutdown()
    srv.server_close()


def test_http_server_headers_and_raw_traversal(server: tuple[str, int]) -> None:
    assert ServeConfig().host == "127.0.0.1"
    conn = http.client.HTTPConnection(*server, timeout=10)
    conn.request("GET", "/run/viewer-run/")
    r = conn.getresponse()
    assert r.status == 200 and "script-src 'self'" in r.getheader("Content-Security-Policy")
    r.read()
    for raw in ("/../../etc/passwd", "/static/../viewer.py"):
        conn.request("GET", raw)  # sent as is: http.client does not normalise the path
        r = conn.getresponse()
        assert r.status == 403 and b"root:" not in r.read()
    conn.close()


def test_the_read_page_takes_a_posted_text_and_nothing_else_takes_posts(
        server: tuple[str, int]) -> None:
    from urllib.parse import urlencode

    from neuroscribe.viewer.read_page import MAX_CHARS

    conn = http.client.HTTPConnection(*server, timeout=60)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    text = "the cat <b>sat</b> & \"quoted\""
    conn.request("POST", "/run/viewer-run/read", urlencode({"text": text}), form)
    r = conn.getresponse()
    page = r.read().decode()
    assert r.status == 200 and 'class="readtoks"' in page
    assert "&lt;b&gt;sat&lt;/b&gt; &amp; &quot;quoted&quot;" in page and "<b>sat" not in page
    conn.request("POST", "/run/viewer-run/", urlencode({"text": text}), form)
    r = conn.getresponse()
    assert r.status == 405 and r.read()
    conn.request("POST", "/run/viewer-run/read", "text=" + "a" * (4 * MAX_CHARS + 100), form)
    r = conn.getresponse()
    assert r.status == 413 and r.read()
    conn.close()


def test_export_html(tmp_path: Path, viewer_run: Path) -> None:
    db = sqlite3.connect(viewer_run / "index.sqlite")
    units = db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
    explained = db.execute("SELECT COUNT(*) FROM explanations WHERE explanation IS NOT NULL"
                           ).fetchone()[0]
    out = tmp_path / "site"
    n = export_html(viewer_run, out, ExportConfig(bench=str(tmp_path), units="all"))
    assert len(list((out / "unit").rglob("*.html"))) == units and n > units
    index = (out / "index.html").read_text()
    for href in re.findall(r'href="([^"#?]+)"', index):  # every link resolves on disk
        assert (out / href).resolve().is_file(), href
    page = (out / "unit" / HP0 / "0.html").read_text()
    for href in re.findall(r'(?:href|src)="([^"#?]+)"', page):
        assert (out / "unit" / HP0 / href).resolve().is_file(), href
    assert "window.NS_UNITS" in (out / "static" / "search-data.js").read_text()
    small = tmp_path / "small"  # the default: pages of explained units only, and no dead link
    export_html(viewer_run, small, ExportConfig(bench=str(tmp_path)))
    assert len(list((small / "unit").rglob("*.html"))) == explained < units
    for page in [small / "index.html", *(small / "list").glob("*.html")]:
        for href in re.findall(r'href="([^"#?]+)"', page.read_text()):
            assert (page.parent / href).resolve().is_file(), (page, href)
    with pytest.raises(UserError, match="outside the run"):
        export_html(viewer_run, viewer_run / "site", ExportConfig())


def test_unit_page_shows_output_tokens(site: Site, viewer_run: Path) -> None:
    import html as html_mod

    from neuroscribe.record.output_tokens import load_output_tokens

    lens = load_output_tokens(viewer_run, HP0)
    assert lens is not None  # written at the end of record
    status, page = get(site, f"/run/viewer-run/unit/{HP0}/3")
    assert status == 200 and "Output tokens (logit lens)" in page
    promoted = page.split("promoted: ", 1)[1].split("</p>", 1)[0]
    titles = [float(t) for t in re.findall(r'title="([^"]+)"', promoted)]
    assert titles == [v for _, v in lens[3]["promoted"]]
    shown = [html_mod.unescape(re.sub(r"<[^>]+>", "", s))
             for s in re.findall(r'<span class="t"[^>]*>(.*?)</span>', promoted)]
    assert len(shown) == len(lens[3]["promoted"])
