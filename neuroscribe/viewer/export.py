"""``neuroscribe export-html RUN_DIR OUT``: the viewer's pages as a static site that opens from
disk, with text search in the page (``static/search-data.js``) and no server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import neuroscribe.viewer.pages as pages
from neuroscribe.errors import UserError
from neuroscribe.viewer.server import ASSETS, NAME, ExportConfig, Site


def export_html(run_dir: Path, out: Path, cfg: ExportConfig) -> int:
    """Write the static site; returns the number of pages written."""
    from neuroscribe.runs import atomic_write_text

    site = Site([run_dir], cfg)
    run = next(iter(site.runs.values()))
    if run.problem:
        raise UserError(f"cannot export {run_dir}: {run.problem}")
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise UserError("write the static site outside the run folder")
    n = 0

    def write(rel: str, html: str) -> None:
        nonlocal n
        atomic_write_text(out / rel, html)
        n += 1

    (out / "static").mkdir(parents=True, exist_ok=True)
    for asset in ASSETS.iterdir():
        shutil.copyfile(asset, out / "static" / asset.name)
    units = run.idx.all_units()
    todo = {(r["safe"], r["unit"]) for r in units if cfg.units == "all" or r["explanation"]}

    def nav(depth: int) -> pages.StaticNav:
        return pages.StaticNav(depth, todo)

    data = [[nav(0).unit(r["safe"], r["unit"]), pages.unit_name(r),
             r["explanation"] or "", r["score"]] for r in units]
    atomic_write_text(out / "static" / "search-data.js",
                      "window.NS_UNITS = " + json.dumps(data, allow_nan=False) + ";\n")
    per = cfg.per_page
    n_pages = max(1, -(-len(units) // per))
    for sort, desc in pages.STATIC_SORTS:
        for p in range(1, n_pages + 1):
            rel = nav(0).listing(sort, desc, p, {})
            depth = rel.count("/")
            rows, total = run.idx.page(sort, desc, p, per)
            write(rel, pages.index_page(nav(depth), run.name, run.idx, rows, total,
                                        sort, desc, p, per, {}))
    for safe, unit in sorted(todo):
        write(nav(0).unit(safe, unit), site.unit(nav(2), run, safe, str(unit)))
    write("search.html", pages.search_page(pages.StaticNav(0), run.name, "", "text", [],
                                           "type a few words: text search runs in the browser"))
    write("bench/index.html", pages.bench_index(pages.StaticNav(1), [
        (k, str(v.parent)) for k, v in site.bench.items()]))
    for name in site.bench:
        png = site.bench_png(name)
        if png:
            shutil.copyfile(png, out / "bench" / f"{name}.png")
        write(f"bench/{name}.html", site.bench_page(pages.StaticNav(1), name,
                                                   f"{name}.png" if png else None))
    if (run_dir / "images").is_dir():
        shutil.copytree(run_dir / "images", out / "images", dirs_exist_ok=True,
                        ignore=lambda d, names: [x for x in names if (Path(d) / x).is_symlink()
                                                 or not NAME.fullmatch(x) or not (
                                                     (Path(d) / x).is_dir() or x.endswith(".png"))])
    return n
