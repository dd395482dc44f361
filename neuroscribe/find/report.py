"""Running ``bench-find``: the suite, the agents (each function through a sandboxed black
box), FIND's evaluation, and the JSON report and readable tables under the run folder.
Answers are saved one file per agent and function, so ``--resume`` skips finished work."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.find.agents import Answer, BlackBox, FunctionFailure, OfflineAgent
from neuroscribe.find.eval import Evaluator, FindConfig
from neuroscribe.find.function import FindFunction
from neuroscribe.find.suite import (
    SuiteConfig,
    load_suite,
    make_suite,
    save_suite,
    saved_config,
)
from neuroscribe.runs import environment, write_json
from neuroscribe.sandbox import SandboxConfig, Worker, run_code

LLM_AGENTS = ("baseline", "aia")


def make_agents(cfg: FindConfig, llm_cfg: Any) -> dict[str, Any]:
    names = [a for a in cfg.agents.split(",") if a]
    known = ("offline", *LLM_AGENTS)
    if bad := [a for a in names if a not in known]:
        raise UserError(f"unknown agent {bad[0]!r}; have {', '.join(known)}")
    if bad := [t for t in cfg.tools.split(",") if t and t != "fit"]:
        raise UserError(f"unknown AIA tool {bad[0]!r}; have fit")
    client = None
    if any(a in LLM_AGENTS for a in names):
        from neuroscribe.llm.client import make_client

        client = make_client(llm_cfg)
    from neuroscribe.find.aia import LLMAgent

    factories: dict[str, Any] = {
        "offline": lambda: OfflineAgent(),
        "baseline": lambda: LLMAgent(client, "baseline", rounds=0, n_random=cfg.n_random),
        "aia": lambda: LLMAgent(client, "aia", rounds=cfg.max_rounds, n_random=cfg.n_random,
                                max_inputs=cfg.max_inputs, min_rounds=cfg.min_rounds,
                                tools=cfg.tools),
    }
    return {a: factories[a]() for a in names}


PRELOADABLE = ("torch", "scipy.signal", "scipy.special")


def preloads(fns: list[FindFunction]) -> str:
    """Modules that the functions' code imports and that cannot load under the audit hook
    (torch needs ctypes, scipy.signal a subprocess module): the worker imports them first."""
    return ",".join(m for m in PRELOADABLE if any(f"import {m}" in f.code or f"from {m} "
                                                  in f.code for f in fns))


def function_folders(fns: list[FindFunction]) -> tuple[str, ...]:
    """The folders of functions loaded from FIND's layout (their code sets ``__file__``, and
    FIND's MLP functions read their weights beside it): bound read-only into the sandbox."""
    found = {str(Path(m.group(1)).parent) for fn in fns
             if (m := re.match(r"__file__ = '([^']+)'", fn.code))}
    return tuple(sorted(found))


def make_workers(cfg: FindConfig, preload: str = "", binds: tuple[str, ...] = ()
                 ) -> dict[str, Worker]:
    """Sandboxed workers per category; the numeric one imports ``preload`` before its audit
    hook is set (FIND's code imports scipy, and its MLP functions torch)."""
    from neuroscribe.simulate.core import embedding_model_path

    base = SandboxConfig(timeout=cfg.fn_timeout, memory_mb=cfg.memory_mb, cpu_seconds=36000,
                         isolation=cfg.sandbox)
    entity = dataclasses.replace(base, memory_mb=0)  # torch reserves much address space
    numeric = (Worker(entity if "torch" in preload else base,
                      {"NEUROSCRIBE_PRELOAD": preload}, startup_timeout=300.0, ro_binds=binds)
               if preload else Worker(base, ro_binds=binds))
    return {"numeric": numeric, "string": Worker(base), "puzzle": Worker(base),
            "entity": Worker(entity, {"NEUROSCRIBE_EMBED_PATH": str(embedding_model_path())},
                             startup_timeout=300.0)}


def group_of(fn: FindFunction) -> str:
    """The row of the per-op table a function counts in."""
    groups = {"numeric": lambda: fn.op.split(":")[0],
              "string": lambda: "composed" if ("+" in fn.op or ";" in fn.op) else fn.op,
              "entity": lambda: "two concepts" if "+" in fn.op else "one concept",
              "puzzle": lambda: "puzzle"}
    return f"{fn.category}/{groups[fn.category]()}"


KEPT = ("id", "category", "op", "group", "agent", "truth", "seconds", "variant", "answer")


def regenerated(suite_cfg: SuiteConfig, saved: Path) -> list[FindFunction]:
    """The suite made again from its config, for ``--rescore``; refused when its functions
    are not the saved ones (the generator changed: their answers answer other functions)."""
    fns = make_suite(suite_cfg)
    if saved.exists():
        old = {f.id: f.params for f in load_suite(saved)}
        if old != {f.id: f.params for f in fns}:
            raise UserError(f"{saved}: the generator now makes other functions from this seed; "
                            "--rescore needs the same ones (rerun the agents instead)")
    return fns


async def solve_one(agent: Any, fn: FindFunction, worker: Worker, cfg: FindConfig) -> Answer:
    box = BlackBox(fn.code, worker, cfg.fn_timeout)
    try:
        ans = await agent.solve(box, fn.category)
    except FunctionFailure as e:
        ans = Answer(failure=str(e))
    except UserError:  # e.g. the LLM endpoint refuses the key: no function can succeed
        raise
    except Exception as e:  # noqa: BLE001 - one agent failing on one function is a result
        ans = Answer(failure=f"agent error: {type(e).__name__}: {e}"[:300])
    ans.n_inputs = box.n_inputs
    return ans


async def run_bench(cfg: FindConfig, suite_cfg: SuiteConfig, llm_cfg: Any,
                    resume: bool, rescore: bool = False) -> dict[str, Any]:
    out = Path(cfg.out)
    if cfg.suite and not cfg.suite.startswith("find:"):  # the saved suite's own seed and sizes
        suite_cfg = saved_config(Path(cfg.suite)) or suite_cfg
    config = {"find": dataclasses.asdict(cfg), "suite": dataclasses.asdict(suite_cfg),
              "llm": dataclasses.asdict(llm_cfg)}
    if (out / "find.json").exists() and not resume:
        raise UserError(f"{out} already holds a bench-find report; --resume reuses it")
    if (out / "config.json").exists() and json.loads((out / "config.json").read_text()) \
            != config:
        raise UserError(f"{out} holds a bench-find run with another config; use a new --out")
    agents = make_agents(cfg, llm_cfg)  # bad agent names fail before anything is written
    write_json(out / "config.json", config)
    if cfg.suite.startswith("find:"):
        from neuroscribe.find.dir import load_find_dir

        fns = load_find_dir(cfg.suite[len("find:"):], cfg.find_variant)
    elif cfg.suite:
        fns = load_suite(Path(cfg.suite))
    elif resume and (out / "suite.json").exists() and not rescore:
        fns = load_suite(out / "suite.json")
    elif rescore:
        fns = regenerated(suite_cfg, out / "suite.json")
    else:
        fns = make_suite(suite_cfg)
    save_suite(fns, suite_cfg, out / "suite.json")
    workers = make_workers(cfg, preloads(fns), function_folders(fns))

    def truth(fn: FindFunction, xs: list[Any], entry: str = "f_truth") -> list[Any]:
        r = workers[fn.category].call(fn.code, xs, entry, cfg.fn_timeout)
        if not r.ok:
            raise FunctionFailure(f"the function failed ({r.status}): {r.reason}")
        return r.outputs

    code_cfg = SandboxConfig(timeout=cfg.code_timeout, memory_mb=cfg.memory_mb,
                             cpu_seconds=int(cfg.code_timeout) + 5, isolation=cfg.sandbox)
    evaluator = Evaluator(cfg, truth, lambda code, xs: run_code(code, xs, code_cfg))
    results = []
    try:
        for name, agent in agents.items():
            for fn in fns:
                path = out / "answers" / name / f"{fn.id}.json"
                if resume and path.exists():
                    rec = json.loads(path.read_text())
                    if rescore:  # the saved answer, scored by this version's evaluator
                        rec = {k: v for k, v in rec.items() if k in KEPT} | \
                            evaluator.score(fn, Answer(**rec["answer"]))
                        write_json(path, rec)
                    results.append(rec)
                    continue
                t0 = time.perf_counter()
                ans = await solve_one(agent, fn, workers[fn.category], cfg)
                seconds = time.perf_counter() - t0
                rec = {"id": fn.id, "category": fn.category, "op": fn.op, "group": group_of(fn),
                       "agent": name, "truth": fn.description, "seconds": round(seconds, 3),
                       **({"variant": fn.params["variant"]} if "variant" in fn.params else {}),
                       "answer": dataclasses.asdict(ans), **evaluator.score(fn, ans)}
                write_json(path, rec)
                results.append(rec)
    finally:
        for w in workers.values():
            w.close()
    # the LLM agents share one client: its usage per stage (find-baseline, find-aia)
    usage = next((a.client.usage_report() for a in agents.values() if hasattr(a, "client")), {})
    report = {"config": config, "environment": environment(), "n_functions": len(fns),
              "suite": dict(sorted(_count(f.category for f in fns).items())),
              "agents": summarize(results), "llm_usage": usage, "results": results}
    write_json(out / "find.json", report)
    (out / "find.txt").write_text(format_tables(report) + "\n")
    return report


def _count(items: Any) -> dict[str, int]:
    c: dict[str, int] = defaultdict(int)
    for i in items:
        c[i] += 1
    return dict(c)


def _stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {"n": len(rows), "solved": sum(bool(r["solved"]) for r in rows),
                         "failures": sum(bool(r.get("failure")) for r in rows),
                         "seconds": round(sum(r["seconds"] for r in rows), 1),
                         "llm_calls": sum(r["answer"]["llm_calls"] for r in rows)}
    d["rate"] = d["solved"] / d["n"] if d["n"] else 0.0
    for key in ("nmse", "nmse_var", "iou", "exact_match", "unit_test_accuracy"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            median = key.startswith("nmse")
            d[f"median_{key}" if median else f"mean_{key}"] = (
                statistics.median(vals) if median else statistics.fmean(vals))
    if var := [r for r in rows if "nmse_var" in r]:
        d["solved_var"] = sum(below(r.get("nmse_var")) for r in var)
        d["solved_released"] = sum(below(r.get("nmse_released")) for r in var)
    return d


def below(v: float | None, threshold: float = 0.1) -> bool:
    """An NMSE counts as solved below the threshold; None (no score) does not, 0 does."""
    return v is not None and v < threshold


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        by[r["agent"]]["categories"][r["category"]].append(r)
        by[r["agent"]]["ops"][r["group"]].append(r)
        if r.get("variant"):
            by[r["agent"]]["ops"][f"numeric/variant:{r['variant']}"].append(r)
        by[r["agent"]]["all"]["all"].append(r)
    return {a: {"total": _stats(d["all"]["all"]),
                "categories": {k: _stats(v) for k, v in sorted(d["categories"].items())},
                "ops": {k: _stats(v) for k, v in sorted(d["ops"].items())}}
            for a, d in by.items()}


def _cell(s: dict[str, Any] | None) -> str:
    return "-" if not s else f"{s['solved']:>3}/{s['n']:<3} {100 * s['rate']:5.1f}%"


def format_tables(report: dict[str, Any]) -> str:
    agents = report["agents"]
    names = list(agents)
    head = "".join(f"{n:>16}" for n in names)
    suite = ", ".join(f"{v} {k}" for k, v in report["suite"].items())
    lines = [f"FIND-style benchmark ({suite} functions)", "",
             "success per category (solved / n)", f"{'category':<24}{head}"]
    cats = sorted({c for a in agents.values() for c in a["categories"]})
    for c in cats + ["all"]:
        row = [agents[n]["categories"].get(c) if c != "all" else agents[n]["total"]
               for n in names]
        lines.append(f"{c:<24}" + "".join(f"{_cell(s):>16}" for s in row))
    lines += ["", "category metrics", f"{'metric':<24}{head}"]
    metrics = [("numeric", "median_nmse", "numeric median NMSE"),
               ("numeric", "median_nmse_var", "numeric median NMSE/var"),
               ("numeric", "solved_var", "numeric NMSE/var < 0.1"),
               ("numeric", "solved_released", "NMSE vs released < 0.1"),
               ("numeric", "mean_iou", "numeric interval IoU"),
               ("string", "mean_exact_match", "string exact match"),
               ("entity", "mean_unit_test_accuracy", "entity unit tests (1/3)")]
    for cat, key, label in metrics:
        vals = [agents[n]["categories"].get(cat, {}).get(key) for n in names]
        if any(v is not None for v in vals):
            lines.append(f"{label:<24}" + "".join(
                f"{'-' if v is None else format(v, '.3g'):>16}" for v in vals))
    lines += ["", "success per op", f"{'op':<24}{head}"]
    ops = sorted({o for a in agents.values() for o in a["ops"]})
    for o in ops:
        lines.append(f"{o:<24}" + "".join(f"{_cell(agents[n]['ops'].get(o)):>16}"
                                          for n in names))
    lines += ["", "cost", f"{'':<24}{head}"]
    for key, label in (("seconds", "agent seconds"), ("llm_calls", "LLM calls"),
                       ("failures", "failures")):
        lines.append(f"{label:<24}" + "".join(f"{agents[n]['total'][key]:>16}" for n in names))
    fails = [r for r in report["results"] if r.get("failure")]
    if fails:
        lines += ["", f"failures ({len(fails)}; first 8)"]
        lines += [f"  {r['agent']:<9}{r['id']:<14}{r['failure'][:90]}" for r in fails[:8]]
    return "\n".join(lines)
