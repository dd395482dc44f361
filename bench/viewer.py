"""Viewer speed at scale: a synthetic run of 100,000 units, served by ``neuroscribe serve``.

Builds a run folder as the pipeline writes it (``record.json``, ``vocab.json``, one records
file per hookpoint with every tensor the unit page reads, and ``index.sqlite`` with units,
explanations and valid-split scores; the per-unit JSON files are left out), builds the viewer
index (FTS5 + MiniLM embeddings of the distinct explanations), starts the server in its own
process and measures, per page, the time to first byte and the whole response with
``http.client`` (median of ``--reps``), then the same pages in headless Chromium (navigation
timing: responseStart and loadEventEnd). Writes ``bench/results/viewer.json``.

    python bench/viewer.py [--units 100000] [--texts 5000] [--reps 7]
    python bench/viewer.py --screenshot runs/demo   # docs/viewer-unit.png
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HOOKPOINTS = ("model.layers.1.mlp.act_fn", "model.layers.2.mlp.act_fn",
              "model.layers.3.mlp.act_fn:sae=/tmp/sae-bench")
TOPICS = ("names of people", "verbs of motion", "numbers and dates", "punctuation at line ends",
          "words about the sea", "archaic pronouns", "legal terms", "colours", "body parts",
          "words after 'the'", "closing brackets", "plural nouns", "question words", "royal titles",
          "negations", "weather", "food and drink", "places in Italy", "love and desire", "war")
FRAMES = ("{t}", "{t} in dialogue", "{t} near the start of a line", "{t}, mostly capitalised",
          "the first token of {t}", "{t} and related words", "{t} in stage directions")
TARGET_MS = 300


def synthetic_run(run: Path, n_units: int, n_texts: int, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    from neuroscribe.models import layer_index, safe_name
    from neuroscribe.results import SCHEMA
    from neuroscribe.runs import write_json

    rng = np.random.default_rng(seed)
    (run / "records").mkdir(parents=True, exist_ok=True)
    vocab = [f"tok{i}" for i in range(1000)] + [" ", "\n", "<|endoftext|>"]
    write_json(run / "vocab.json", vocab)
    per = [n_units // len(HOOKPOINTS)] * len(HOOKPOINTS)
    per[-1] += n_units - sum(per)
    k, ctx, bins = 8, 32, 64
    for hp, u in zip(HOOKPOINTS, per):
        t = {}
        for prefix, n in (("top", k), ("random", k), *((f"q{i}", 2) for i in range(4))):
            t[f"{prefix}_ctx"] = rng.integers(0, 10_000, (u, n)).astype(np.int64)
            t[f"{prefix}_acts"] = rng.gamma(1.0, 1.0, (u, n, ctx)).astype(np.float32)
            t[f"{prefix}_tokens"] = rng.integers(0, len(vocab), (u, n, ctx)).astype(np.int32)
        for m in ("mean", "variance", "skewness", "kurtosis"):
            t[m] = rng.normal(size=u).astype(np.float32)
        t["quantile_boundaries"] = np.sort(rng.gamma(1.0, 1.0, (u, 5)), 1).astype(np.float32)
        t["hist_edges"] = np.tile(np.linspace(-1, 5, bins + 1, dtype=np.float32), (u, 1))
        t["hist_counts"] = rng.integers(0, 1000, (u, bins)).astype(np.int64)
        save_file(t, str(run / "records" / f"{safe_name(hp)}.safetensors"))
    texts = sorted({f.format(t=t) + (f" (variant {i})" if i else "")
                    for i in range(n_texts // (len(FRAMES) * len(TOPICS)) + 1)
                    for f in FRAMES for t in TOPICS})[:n_texts]
    pick = random.Random(seed)
    db = sqlite3.connect(run / "index.sqlite")
    db.executescript(SCHEMA)
    for hp, u in zip(HOOKPOINTS, per):
        s = rng.uniform(-0.2, 0.9, (u, 3))
        db.executemany("INSERT INTO units VALUES (?,?,?,?,?,?,?,?)", (
            (hp, layer_index(hp), i, float(rng.gamma(2.0)), 0.0, 1.0, 0.0, 0.0)
            for i in range(u)))
        expl = [pick.choice(texts) for _ in range(u)]
        db.executemany("INSERT INTO explanations VALUES (?,?,?,?,?)",
                       ((hp, i, "tokens", expl[i], None) for i in range(u)))
        db.executemany("INSERT INTO scores VALUES (?,?,?,?,?,?,?,?,?)", (
            (hp, i, "embedding", "valid", v, float(s[i, j]), None, None, expl[i])
            for i in range(u) for j, v in enumerate(("all", "top", "random"))))
    db.commit()
    db.close()
    write_json(run / "record.json", {"complete": True, "hookpoints": list(HOOKPOINTS),
                                     "units": dict(zip(HOOKPOINTS, per)), "config": {}})


def fetch(host: str, port: int, path: str) -> tuple[float, float, int, int]:
    """(ms to first byte, ms to last byte, status, bytes) on a fresh connection."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    t0 = time.perf_counter()
    conn.request("GET", path)
    r = conn.getresponse()
    first = time.perf_counter()
    body = r.read()
    last = time.perf_counter()
    conn.close()
    return (first - t0) * 1000, (last - t0) * 1000, r.status, len(body)


def browser_timing(base: str, paths: dict[str, str], reps: int) -> dict[str, dict[str, float]]:
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                              args=["--no-sandbox", "--disable-gpu",
                                    "--disable-background-networking"])
        page = b.new_page(viewport={"width": 1366, "height": 768})
        for name, path in paths.items():
            page.goto(base + path)  # warm: the stylesheet cached, as when browsing
            navs = []
            for _ in range(reps):
                page.goto(base + path, wait_until="load")
                navs.append(page.evaluate("JSON.parse(JSON.stringify("
                                          "performance.getEntriesByType('navigation')[0]))"))
            out[name] = {
                "ttfb_ms_median": round(statistics.median(
                    n["responseStart"] - n["requestStart"] for n in navs), 1),
                "load_ms_median": round(statistics.median(
                    n["loadEventEnd"] - n["startTime"] for n in navs), 1)}
        b.close()
    return out


def screenshot(run: Path, out: Path) -> None:
    """The README's picture: the unit page of the run's best-scoring unit, 1366x1100."""
    import threading

    from playwright.sync_api import sync_playwright

    from neuroscribe.viewer.server import Site, ViewerConfig, make_server

    site = Site([run], ViewerConfig())
    name, r = next(iter(site.runs.items()))
    best = r.idx.page("score", True, 1, 1)[0][0]
    srv = make_server(site, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host, port = srv.server_address[:2]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                              args=["--no-sandbox", "--disable-gpu",
                                    "--disable-background-networking"])
        page = b.new_page(viewport={"width": 1366, "height": 1100})
        page.goto(f"http://{host}:{port}/run/{name}/unit/{best['safe']}/{best['unit']}")
        page.screenshot(path=str(out))
        b.close()
    srv.shutdown()
    print(f"{best['hookpoint']}#{best['unit']} -> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--texts", type=int, default=5000, help="distinct explanations")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench-viewer"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "viewer.json"))
    ap.add_argument("--screenshot", metavar="RUN", help="only save the unit page of RUN's best "
                    "unit as docs/viewer-unit.png")
    args = ap.parse_args()
    if args.screenshot:
        return screenshot(Path(args.screenshot), ROOT / "docs" / "viewer-unit.png")
    run = Path(args.run)
    t0 = time.perf_counter()
    fresh = not (run / "record.json").exists()
    if fresh:
        synthetic_run(run, args.units, args.texts)
    t_run = round(time.perf_counter() - t0, 1) if fresh else None  # None: an earlier run reused
    from neuroscribe.viewer.index import db_path, ensure_index

    t0 = time.perf_counter()
    ensure_index(run)
    t_index = time.perf_counter() - t0
    proc = subprocess.Popen([sys.executable, "-m", "neuroscribe", "serve", str(run), "--port",
                             "0", "--bench", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        host, port = line.split("http://")[1].split("/")[0].rsplit(":", 1)
        base = f"/run/{run.name}"
        hp = HOOKPOINTS[-1].split(":")[0] + "__sae-sae-bench-"
        unit_safe = sqlite3.connect(db_path(run)).execute(
            "SELECT safe FROM units WHERE safe LIKE ? LIMIT 1", (hp + "%",)).fetchone()[0]
        paths = {
            "index (score desc, page 1)": f"{base}/",
            "index (unit order, page 1000)": f"{base}/?sort=unit&order=asc&page=1000",
            "index (score asc, filtered)": f"{base}/?sort=score&order=asc&min=0.5&max=0.8"
                                           "&layer=3&kind=feature",
            "index (explanation order, last page)": f"{base}/?sort=explanation&page=2000",
            "search text (common word)": f"{base}/search?q=words&mode=text",
            "search text (two words)": f"{base}/search?q=sea+dialogue&mode=text",
            "search meaning": f"{base}/search?q=ocean+and+ships&mode=meaning",
            "unit page": f"{base}/unit/{unit_safe}/777",
        }
        fetch(host, int(port), paths["search meaning"])  # loads the sentence encoder once
        results = {}
        for name, path in paths.items():
            runs = [fetch(host, int(port), path) for _ in range(args.reps)]
            assert all(r[2] == 200 for r in runs), (name, runs[0])
            results[name] = {"path": path, "bytes": runs[0][3],
                             "ttfb_ms_median": round(statistics.median(r[0] for r in runs), 1),
                             "total_ms_median": round(statistics.median(r[1] for r in runs), 1),
                             "total_ms_max": round(max(r[1] for r in runs), 1)}
            print(f"{name:<40} ttfb {results[name]['ttfb_ms_median']:7.1f} ms   total "
                  f"{results[name]['total_ms_median']:7.1f} ms   {runs[0][3]:>8,} bytes")
        chrome = browser_timing(f"http://{host}:{port}", paths, 5)
        for name, t in chrome.items():
            print(f"chromium {name:<40} ttfb {t['ttfb_ms_median']:7.1f} ms   load "
                  f"{t['load_ms_median']:7.1f} ms")
    finally:
        proc.terminate()
        proc.wait(10)
    mat = np.random.default_rng(0).normal(size=(args.units, 384)).astype(np.float32)
    q = mat[0] / np.linalg.norm(mat[0])
    t0 = time.perf_counter()
    for _ in range(10):
        sims = mat @ q
        top = np.argpartition(-sims, 50)[:50]
        top[np.argsort(-sims[top])]
    worst = (time.perf_counter() - t0) / 10 * 1000
    report = {"units": args.units, "distinct_explanations": args.texts, "reps": args.reps,
              "target_ms": TARGET_MS, "synthetic_run_seconds": t_run,
              "viewer_index_seconds": round(t_index, 1),
              "viewer_sqlite_mb": round(db_path(run).stat().st_size / 2**20, 1),
              "http": results, "chromium": chrome,
              "meaning_rank_all_units_distinct_ms": round(worst, 1),
              "all_under_target": all(r["total_ms_median"] < TARGET_MS
                                      for r in results.values()),
              "chromium_all_under_target": all(t["load_ms_median"] < TARGET_MS
                                               for t in chrome.values()),
              "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"viewer index built in {t_index:.1f}s; ranking {args.units:,} distinct embeddings "
          f"takes {worst:.1f} ms; -> {args.out}")


if __name__ == "__main__":
    main()
