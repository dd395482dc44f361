"""The viewer in a real browser: Playwright drives Debian's headless Chromium.

A server runs on a run made by the pipeline (see ``test_viewer.make_viewer_run``, whose
tokenizer holds hostile strings as single tokens). The browser opens the index, sorts,
searches by text and by meaning, opens a unit, checks every heatmap value against the records,
checks that no hostile token runs, and saves a screenshot under ``tests/artifacts/``.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_viewer import HOSTILE, HP0, make_viewer_run

from neuroscribe.viewer.server import Site, ViewerConfig, make_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason="Debian's chromium is not installed (make install)")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run = make_viewer_run(tmp_path_factory.getbasetemp())
    site = Site([run], ViewerConfig(bench=str(run / "no-bench")))
    srv = make_server(site, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host, port = srv.server_address[:2]
    yield f"http://{host}:{port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1366, "height": 768})
    pg = ctx.new_page()
    pg.dialogs = []  # any alert() means a hostile token ran
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.set_default_timeout(15_000)
    yield pg
    ctx.close()


def scores(page: Any) -> list[float | None]:
    cells = page.locator("table.units tbody tr td:nth-child(5)").all_inner_texts()
    return [None if c.strip() == "–" else float(c) for c in cells]


def test_browse_sort_search_and_unit(page: Any, base_url: str, viewer_run: Path) -> None:
    from neuroscribe.record.core import RecordStore

    page.goto(base_url + "/")  # redirects to the only run
    assert page.locator("h1").inner_text() == "Units"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    desc = [s for s in scores(page) if s is not None]
    assert len(desc) >= 2 and desc == sorted(desc, reverse=True)
    page.click("th a[data-sort=score]")  # sort ascending now
    page.wait_for_url("**order=asc**")
    asc = [s for s in scores(page) if s is not None]
    assert asc == sorted(asc) and asc[0] == desc[-1]

    best = page.locator("table.units tbody tr").first  # on the asc page: the worst scored unit
    explanation = best.locator(".expl").inner_text()
    word = json.loads("[" + explanation.split("tokens ", 1)[1].split(", mostly")[0] + "]")[0]
    page.fill("header input[name=q]", word)
    page.press("header input[name=q]", "Enter")
    page.wait_for_url("**/search?**")
    texts = page.locator("#results .expl").all_inner_texts()
    words = re.findall(r"\w+", word.lower())  # each a prefix of a word of every hit
    assert texts and all(w in t.lower() for t in texts for w in words)
    assert explanation in texts

    page.check("input[value=meaning]")  # the live search (JavaScript) asks the JSON API
    page.fill("#bigq", explanation)
    page.wait_for_selector("#results table tr td:first-child >> text=/^1\\.000|^0\\.99/")
    first = page.locator("#results tbody tr").first
    assert first.locator("td").nth(2).inner_text() == explanation
    first.locator("a").click()
    page.wait_for_url("**/unit/**")

    hp, unit = page.url.split("/unit/")[1].split("/")
    nr = RecordStore(viewer_run).neuron_record(hp, int(unit))
    spans = page.eval_on_selector_all(
        ".records.top span.t", "els => els.map(e => [e.title, e.dataset.v])")
    expected = [(t, v) for r in nr.most_positive_activation_records
                for t, v in zip(r.tokens, r.activations)]
    assert [(json.loads(t.rsplit(" = ", 1)[0]), float(v)) for t, v in spans] == expected
    assert [float(t.rsplit(" = ", 1)[1]) for t, _ in spans] == [v for _, v in expected]
    rnd = page.eval_on_selector_all(".records.random span.t", "els => els.map(e => +e.dataset.v)")
    assert rnd == [v for r in nr.random_sample for v in r.activations]
    page.hover(".records.top span.t >> nth=0")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer-unit.png"), full_page=False)
    assert (ARTIFACTS / "viewer-unit.png").stat().st_size > 10_000
    assert page.dialogs == []


def test_hostile_tokens_never_run(page: Any, base_url: str) -> None:
    seen: set[str] = set()
    for unit in range(6):
        page.goto(f"{base_url}/run/viewer-run/unit/{HP0}/{unit}")
        texts = page.eval_on_selector_all("span.t", "els => els.map(e => e.textContent)")
        seen |= set(texts) & set(HOSTILE)
        counts = page.evaluate("""() => ({img: document.images.length,
            b: document.querySelectorAll('main b').length,
            inline: [...document.scripts].filter(s => !s.src).length,
            js: [...document.querySelectorAll('a')].filter(a =>
                a.href.startsWith('javascript:')).length})""")
        assert counts == {"img": 0, "b": 0, "inline": 0, "js": 0}
    assert seen == set(HOSTILE)  # each shown, as its exact text
    page.goto(f"{base_url}/run/viewer-run/search?q=%3Cscript%3Ealert(1)%3C/script%3E")
    assert page.locator("#bigq").input_value() == "<script>alert(1)</script>"
    page.fill("#bigq", '"><img src=x onerror=alert(9)>')  # live search renders as text
    page.wait_for_timeout(800)
    assert page.evaluate("document.images.length") == 0
    assert page.dialogs == []


def test_works_without_javascript(browser: Any, base_url: str) -> None:
    ctx = browser.new_context(java_script_enabled=False)
    page = ctx.new_page()
    page.goto(base_url + "/run/viewer-run/?sort=max_act&order=desc")
    maxima = [float(x) for x in page.locator(
        "table.units tbody tr td:nth-child(8)").all_inner_texts()]
    assert maxima == sorted(maxima, reverse=True)
    page.click("a[rel=next]")
    assert "page=2" in page.url and page.locator("table.units tbody tr").count() > 0
    page.select_option("select[name=layer]", "1")
    page.click("form.filters button")
    layers = page.locator("table.units tbody tr td:nth-child(2)").all_inner_texts()
    assert layers and set(layers) == {"1"}
    page.fill("header input[name=q]", "tokens")
    page.press("header input[name=q]", "Enter")
    assert page.locator("#results tbody tr").count() > 0
    page.goto(base_url + "/run/viewer-run/unit/nope/3")
    assert page.locator("h1").inner_text() == "Not found"
    ctx.close()


def test_static_site_from_disk(page: Any, viewer_run: Path, tmp_path: Path) -> None:
    from neuroscribe.viewer.export import export_html
    from neuroscribe.viewer.server import ExportConfig

    export_html(viewer_run, tmp_path / "site", ExportConfig(bench=str(tmp_path)))
    page.goto((tmp_path / "site" / "index.html").as_uri())
    first = page.locator("table.units tbody tr a").first
    name = first.inner_text()
    first.click()
    assert page.locator("h1").inner_text() == name
    assert page.locator(".records.top span.t").count() > 0
    page.fill("header input[name=q]", "tokens")
    page.press("header input[name=q]", "Enter")  # search.html?q=...: searched in the page
    page.wait_for_selector("#results table")
    texts = page.locator("#results tbody tr td:nth-child(2)").all_inner_texts()
    assert texts and all("tokens" in t for t in texts)
    assert page.dialogs == []


@pytest.fixture(scope="module")
def viewer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_viewer_run(tmp_path_factory.getbasetemp())


def test_read_page_highlights_tokens_and_escapes_hostile_text(page: Any, base_url: str) -> None:
    text = " ".join(HOSTILE) + ' the cat sat on a mat </textarea><img src=x onerror=alert(5)>'
    page.goto(f"{base_url}/run/viewer-run/read")
    page.fill("#readtext", text)
    page.click("form.readform button")
    page.wait_for_selector(".readtoks a.t")
    assert page.locator("#readtext").input_value() == text  # round-trips, as text
    shown = page.eval_on_selector_all(".readtoks a.t", "els => els.map(e => e.textContent)")
    assert set(HOSTILE) <= set(shown)  # the tokenizer holds each as one token: exact text
    counts = page.evaluate("""() => ({img: document.images.length,
        b: document.querySelectorAll('main b').length,
        inline: [...document.scripts].filter(s => !s.src).length})""")
    assert counts == {"img": 0, "b": 0, "inline": 0}
    i = shown.index(HOSTILE[0])
    assert not page.locator(f"#tok-{i}").is_visible()
    page.locator(".readtoks a.t").nth(i).click()  # a click shows that token's units
    assert page.locator(f"#tok-{i}").is_visible()
    assert HOSTILE[0] in page.locator(f"#tok-{i} h3").inner_text()
    assert page.dialogs == []
