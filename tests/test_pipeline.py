"""The whole pipeline on the tiny random GPT-2: Python API, CLI, outputs, splits, resume.

Nothing here compares against numbers copied from a previous run: recorded activations are
checked against a fresh forward pass of the model, files against each other, and a resumed
run against an uninterrupted one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers  # noqa: F401 - import (and set up its logging) outside any capsys

import neuroscribe.cli as cli
import neuroscribe.explain.core as explain_mod
import neuroscribe.models as models_mod
import neuroscribe.pipeline as pipeline
from neuroscribe.corpus import iter_contexts, iter_texts
from neuroscribe.explain.core import ExplainConfig, explain, explanation_path
from neuroscribe.formats import (
    SPLITS_RANDOM,
    SPLITS_TOP,
    NeuronId,
    NeuronSimulationResults,
    interleaved_slices,
    loads,
)
from neuroscribe.models import layer_index
from neuroscribe.pipeline import ScoreConfig, score, score_path
from neuroscribe.record.core import QUANTILES, RecordConfig, RecordStore, record, store_path

HP0, HP1 = "transformer.h.0.mlp.act", "transformer.h.1.mlp.act"
GLOB = "transformer.h.*.mlp.act"
N_UNITS = 6  # units explained and scored per hookpoint
SMALL = dict(max_tokens=3000, ctx_len=32, batch_size=16, quantile_warmup=8, n_top=12,
             n_random=9, n_quantile=2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def flags(**kw: Any) -> list[str]:
    out: list[str] = []
    for k, v in kw.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def run_argv(model: Path, corpus: Path, out: Path, hookpoints: str = GLOB, **kw: Any) -> list[str]:
    opts = {**SMALL, "units": f"first:{N_UNITS}", "simulator": "tokens", **kw}
    return ["run", "--out", str(out), "--model", str(model), "--corpus", str(corpus),
            "--hookpoints", hookpoints, *flags(**opts)]


def record_argv(model: Path, corpus: Path, out: Path, hookpoints: str = GLOB,
                **kw: Any) -> list[str]:
    return ["record", "--out", str(out), "--model", str(model), "--corpus", str(corpus),
            "--hookpoints", hookpoints, *flags(**{**SMALL, **kw})]


def content(path: Path) -> Any:
    """A file's bytes; a safetensors file's tensors and metadata (its header order varies)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return f.metadata(), {k: f.get_tensor(k).tobytes() for k in sorted(f.keys())}


def tree(run_dir: Path, sub: str) -> dict[str, Any]:
    return {str(p.relative_to(run_dir)): content(p)
            for p in sorted((run_dir / sub).rglob("*")) if p.is_file()}


def explained(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "explanations").glob("*/*.json"))]


@pytest.fixture(scope="module")
def cli_run(tiny_model: Path, corpus_file: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete ``neuroscribe run`` over both MLP layers (a glob)."""
    out = tmp_path_factory.mktemp("cli-run") / "run"
    assert cli.main(run_argv(tiny_model, corpus_file, out)) == 0
    return out


# --- mechanics through the Python API ---------------------------------------------------------


def test_api_stages_write_every_output(tiny_model: Path, corpus_file: Path,
                                       tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    rc = RecordConfig(model=str(tiny_model), hookpoints=HP0, corpus=str(corpus_file), seed=7,
                      **SMALL)
    info = record(rc, run)
    explain(ExplainConfig(units=f"first:{N_UNITS}"), run)
    summary = score(ScoreConfig(simulator="tokens"), run)

    saved = json.loads((run / "record.json").read_text())
    assert saved["complete"] is True
    assert saved["config"] == dataclasses.asdict(rc)
    assert saved["seeds"] == {"random_sample": 7}
    assert saved["hookpoints"] == [HP0] and saved["units"] == {HP0: 64}  # n_inner=64
    assert saved["n_tokens"] == saved["n_contexts"] * rc.ctx_len <= rc.max_tokens
    assert info["n_tokens"] == saved["n_tokens"]
    assert json.loads((run / "explain.json").read_text())["config"]["units"] == "first:6"
    assert json.loads((run / "score.json").read_text())["config"]["simulator"] == "tokens"

    vocab = json.loads((run / "vocab.json").read_text())
    assert len(vocab) == len(AutoTokenizer.from_pretrained(tiny_model))
    assert store_path(run, HP0).is_file()
    assert sorted(p.name for p in (run / "records").iterdir()) == [f"{HP0}.safetensors"]

    entries = explained(run)
    assert sorted(e["unit"] for e in entries) == list(range(N_UNITS))
    for e in entries:
        assert explanation_path(run, HP0, e["unit"]).is_file()
        assert e["hookpoint"] == HP0 and e["explainer"] == "tokens"
        assert ("explanation" in e) != ("failure" in e)
    ok = [e for e in entries if "explanation" in e]
    assert ok, "the token baseline should explain some units of the tiny model"

    store = RecordStore(run)
    for e in ok:
        u = e["unit"]
        res = loads(score_path(run, HP0, u).read_text())
        assert isinstance(res, NeuronSimulationResults)
        assert res.neuron_id == NeuronId(layer_index=0, neuron_index=u)
        assert res.scored_explanations[0].explanation == e["explanation"]
        detail = json.loads(score_path(run, HP0, u, "scores").read_text())
        sim = res.scored_explanations[0].scored_simulation
        assert sim.ev_correlation_score == pytest.approx(
            detail["scores"]["valid_all"]["ev_correlation_score"], abs=1e-6)
        # The NeuronSimulationResults hold the valid split: its top then random records.
        nr = store.neuron_record(HP0, u)
        valid = nr.top_split("valid") + nr.random_split("valid")
        seqs = sim.scored_sequence_simulations
        assert [s.simulation.tokens for s in seqs] == [r.tokens for r in valid]
        for s, r in zip(seqs, valid):
            assert s.true_activations == pytest.approx(r.activations)

    db = sqlite3.connect(run / "index.sqlite")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"units", "explanations", "scores"} <= tables
    assert db.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 64
    assert db.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == N_UNITS
    per_unit = 2 * len(pipeline.VARIANTS)  # valid and test, each all / top / random
    assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == per_unit * len(ok)
    u0 = ok[0]["unit"]
    (max_act,) = db.execute("SELECT max_activation FROM units WHERE unit=?", (u0,)).fetchone()
    assert max_act == pytest.approx(store.neuron_record(HP0, u0).max_activation, rel=1e-6)
    db.close()

    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    vals = [json.loads(score_path(run, HP0, e["unit"], "scores").read_text())
            ["scores"]["valid_all"]["ev_correlation_score"] for e in ok]
    vals = [v for v in vals if v is not None]
    assert summary["distribution"]["valid_all"]["n"] == len(vals)
    assert summary["distribution"]["valid_all"]["mean"] == pytest.approx(
        sum(vals) / len(vals), abs=1e-4)
    assert (run / "score_hist.png").read_bytes()[:8] == PNG_MAGIC


def test_recorded_exemplars_match_a_fresh_forward_pass(tiny_model: Path, corpus_file: Path,
                                                       tmp_path: Path) -> None:
    """Top contexts, their activations and tokens, moments and quantile bins, recomputed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    record(RecordConfig(model=str(tiny_model), hookpoints=HP1, corpus=str(corpus_file),
                        **SMALL), run)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    contexts = list(iter_contexts(iter_texts(str(corpus_file)), tok, SMALL["ctx_len"],
                                  SMALL["max_tokens"]))
    store = RecordStore(run)
    assert store.info["n_contexts"] == len(contexts)

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    seen: list[torch.Tensor] = []
    handle = dict(model.named_modules())[HP1].register_forward_hook(
        lambda _m, _a, out: seen.append(out.detach()))
    with torch.no_grad():
        model(input_ids=torch.tensor(contexts), use_cache=False)
    handle.remove()
    acts = seen[0]  # [contexts, ctx_len, units]
    ctx_max = acts.amax(dim=1)

    for u in (0, 5, 63):
        t = store.unit_tensors(HP1, u)
        top = t["top_ctx"].tolist()
        assert len(top) == SMALL["n_top"] and min(top) >= 0
        assert set(top) == set(ctx_max[:, u].topk(SMALL["n_top"]).indices.tolist())
        maxima = [float(ctx_max[c, u]) for c in top]
        assert maxima == sorted(maxima, reverse=True)
        for j, c in enumerate(top):
            assert t["top_tokens"][j].tolist() == contexts[c]
            torch.testing.assert_close(t["top_acts"][j], acts[c, :, u], atol=1e-5, rtol=1e-4)
        rnd = [c for c in t["random_ctx"].tolist() if c >= 0]
        assert len(rnd) == SMALL["n_random"] == len(set(rnd))
        assert not set(rnd) & set(top)
        for j, c in enumerate(t["random_ctx"].tolist()):
            if c >= 0:
                assert t["random_tokens"][j].tolist() == contexts[c]
        x = acts[..., u].double()
        assert float(t["mean"]) == pytest.approx(float(x.mean()), rel=1e-4, abs=1e-6)
        assert float(t["variance"]) == pytest.approx(float(x.var(unbiased=False)), rel=1e-4)
        bounds = t["quantile_boundaries"].tolist()
        assert len(bounds) == len(QUANTILES) and bounds == sorted(bounds)
        for i in range(len(QUANTILES) - 1):
            # the first and last bins are open-ended: every context is in some bin
            lo = -math.inf if i == 0 else bounds[i]
            hi = math.inf if i == len(QUANTILES) - 2 else bounds[i + 1]
            for c in t[f"q{i}_ctx"].tolist():
                if c >= 0:
                    assert lo <= float(ctx_max[c, u]) < hi
        edges, counts = store.histogram(HP1, u)
        assert sum(counts) == x.numel() and len(edges) == len(counts) + 1


def test_neuron_record_splits_are_disjoint_by_context(cli_run: Path) -> None:
    run = cli_run
    store = RecordStore(run)
    for hp in (HP0, HP1):
        for u in range(N_UNITS):
            nr = store.neuron_record(hp, u)
            t = store.unit_tensors(hp, u)
            top = [c for c in t["top_ctx"].tolist() if c >= 0]
            rnd = [c for c in t["random_ctx"].tolist() if c >= 0]
            # The records are the stored contexts, in order, decoded with the run's vocab.
            assert [r.tokens for r in nr.most_positive_activation_records] == [
                [store.vocab[i] for i in t["top_tokens"][j].tolist()] for j in range(len(top))]
            assert len(nr.random_sample) == len(rnd)
            by_tokens = {tuple(store.vocab[i] for i in t[f"{kind}_tokens"][j].tolist()): c
                         for kind, ids in (("top", top), ("random", rnd))
                         for j, c in enumerate(ids)}
            splits: dict[str, list[int]] = {}
            for name in SPLITS_TOP:
                recs = nr.top_split(name) + nr.random_split(name)
                assert nr.split(name) == recs
                splits[name] = [by_tokens[tuple(r.tokens)] for r in recs]
                assert splits[name], f"empty {name} split"
                # Interleaved: split i takes items i, i+S, ... of each list.
                want = top[interleaved_slices(SPLITS_TOP, len(top) // 4)[name]]
                if name in SPLITS_RANDOM:
                    want += rnd[interleaved_slices(SPLITS_RANDOM, len(rnd) // 3)[name]]
                assert splits[name] == want
            every = [c for ids in splits.values() for c in ids]
            assert len(every) == len(set(every)), f"{hp}#{u}: a context is in two splits"
            token_sets = [{tuple(r.tokens) for r in nr.split(n)} for n in SPLITS_TOP]
            for i in range(len(token_sets)):
                for j in range(i + 1, len(token_sets)):
                    assert not token_sets[i] & token_sets[j]


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_run_with_glob_writes_both_hookpoints(cli_run: Path) -> None:
    run = cli_run
    info = json.loads((run / "record.json").read_text())
    assert info["hookpoints"] == [HP0, HP1]
    assert info["config"]["hookpoints"] == GLOB
    for hp in (HP0, HP1):
        assert store_path(run, hp).is_file()
        assert sorted(int(p.stem) for p in (run / "explanations" / hp).glob("*.json")) == list(
            range(N_UNITS))
    entries = explained(run)
    ok = [e for e in entries if "explanation" in e]
    for e in ok:
        res = loads(score_path(run, e["hookpoint"], e["unit"]).read_text())
        assert res.neuron_id == NeuronId(layer_index(e["hookpoint"]), e["unit"])
    assert {layer_index(e["hookpoint"]) for e in ok} == {0, 1}
    db = sqlite3.connect(run / "index.sqlite")
    assert db.execute("SELECT COUNT(*) FROM units").fetchone()[0] == sum(info["units"].values())
    assert db.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == 2 * N_UNITS
    assert db.execute("SELECT COUNT(DISTINCT hookpoint || '#' || unit) FROM scores").fetchone()[
        0] == len(ok)
    db.close()
    assert (run / "summary.json").is_file()
    assert (run / "score_hist.png").read_bytes()[:8] == PNG_MAGIC


def test_score_prints_the_summary_table(fresh_run: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = fresh_run
    capsys.readouterr()
    assert cli.main(["score", str(run), "--simulator", "tokens", "--resume"]) == 0
    stdout = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert "score distribution" in stdout
    for key, d in summary["distribution"].items():
        assert f"{key:<14}{d['n']:>5}{d['mean']:>8.3f}" in stdout
    assert f"index: {run / 'index.sqlite'}  histogram: {run / 'score_hist.png'}" in stdout
    entries = explained(run)
    assert f"failed explanations: {sum('failure' in e for e in entries)}" in stdout
    hp, unit, value, text = summary["best"][0]
    assert f"{value:6.3f}  {hp}#{unit}: {text}" in stdout


def test_cli_stages_one_by_one_equal_run(cli_run: Path, tiny_model: Path,
                                         corpus_file: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = cli_run
    out = tmp_path / "staged"
    assert cli.main(record_argv(tiny_model, corpus_file, out)) == 0
    info = json.loads((out / "record.json").read_text())
    assert f"recorded {info['n_tokens']} tokens at {HP0}, {HP1}" in capsys.readouterr().out
    assert cli.main(["explain", str(out), "--units", f"first:{N_UNITS}"]) == 0
    entries = explained(out)
    n_ok = sum("explanation" in e for e in entries)
    assert (f"explained {n_ok} units, {len(entries) - n_ok} failed"
            in capsys.readouterr().out)
    assert cli.main(["score", str(out), "--simulator", "tokens"]) == 0
    assert "score distribution" in capsys.readouterr().out
    # Same config, same seed: the staged run reproduces 'run' file for file.
    assert tree(out, "records") == tree(run, "records")
    assert tree(out, "explanations") == tree(run, "explanations")
    assert tree(out, "scores") == tree(run, "scores")


def test_hookpoints_subcommand_lists_module_paths(tiny_model: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2LMHeadModel

    names = [n for n, _ in GPT2LMHeadModel.from_pretrained(tiny_model).named_modules() if n]
    assert cli.main(["hookpoints", str(tiny_model)]) == 0
    assert capsys.readouterr().out.splitlines() == names
    assert cli.main(["hookpoints", str(tiny_model), "--filter", "*.mlp.act"]) == 0
    assert capsys.readouterr().out.splitlines() == [HP0, HP1]
    assert models_mod.resolve_hookpoints(
        GPT2LMHeadModel.from_pretrained(tiny_model), ["transformer.h.*.mlp.c_proj:input"]) == [
        "transformer.h.0.mlp.c_proj:input", "transformer.h.1.mlp.c_proj:input"]


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_every_subcommand_has_help(command: str | None,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    if command is None:
        assert all(name in out for name in cli.COMMANDS)
        return
    assert cli.COMMANDS[command][1] in " ".join(out.split())
    wanted = ["--debug", "--verbose"]
    extra = {"hookpoints": ["--filter"], "puzzles": ["--puzzles", "--out"],
             "output-tokens": ["--out"]}
    wanted += extra.get(command, ["--resume"])
    wanted += ["--out"] if command in ("record", "run") else []
    for cls in cli._stage_configs().get(command, []):
        for f in dataclasses.fields(cls):
            wanted.append("--" + f.name.replace("_", "-"))
            assert f.metadata["help"].split()[0] in out
    missing = [w for w in wanted if w not in out]
    assert not missing


def test_record_fewer_contexts_than_warmup(tiny_model: Path, corpus_file: Path,
                                           tmp_path: Path) -> None:
    """The default --quantile-warmup (256 contexts) exceeds this corpus: boundaries still set."""
    run = tmp_path / "run"
    cfg = RecordConfig(model=str(tiny_model), hookpoints=HP0, corpus=str(corpus_file),
                       max_tokens=1000, ctx_len=32)
    assert cfg.quantile_warmup * cfg.ctx_len > cfg.max_tokens
    record(cfg, run)
    t = RecordStore(run).unit_tensors(HP0, 3)
    assert torch.isfinite(t["quantile_boundaries"]).all()
    # Fewer contexts (31) than --n-top (40): unfilled slots are marked -1 and never read.
    n_ctx = RecordStore(run).info["n_contexts"]
    assert (t["top_ctx"] >= 0).sum() == n_ctx < cfg.n_top
    assert len(RecordStore(run).neuron_record(HP0, 3).most_positive_activation_records) == n_ctx


def test_run_with_no_top_records_fails_every_unit_cleanly(
        tiny_model: Path, corpus_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(run_argv(tiny_model, corpus_file, out, hookpoints=HP0, n_top=0)) == 0
    stdout = capsys.readouterr().out
    entries = explained(out)
    assert len(entries) == N_UNITS and all("failure" in e for e in entries)
    assert not list((out / "scores").glob("*/*.json"))
    db = sqlite3.connect(out / "index.sqlite")
    assert db.execute("SELECT COUNT(*) FROM units WHERE max_activation IS NULL").fetchone()[0] \
        == 64
    db.close()
    assert json.loads((out / "summary.json").read_text())["failed_explanations"] == N_UNITS
    assert f"failed explanations: {N_UNITS}" in stdout


def test_default_embedding_simulator(cli_run: Path, tmp_path: Path) -> None:
    """The default simulator (token match + MiniLM similarity) scores the same explanations."""
    run = cli_run
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("scores", "score.json",
                                                            "index.sqlite", "summary.json",
                                                            "score_hist.png"))
    cfg = ScoreConfig()
    assert cfg.simulator == "embedding"
    summary = score(cfg, out)
    ok = [e for e in explained(out) if "explanation" in e]
    assert summary["distribution"]["valid_all"]["n"] >= 1
    weight = cfg.embed_weight
    token_only = {0.0, 10.0 / (1 + weight)}
    graded = False
    for e in ok:
        detail = json.loads(score_path(out, e["hookpoint"], e["unit"], "scores").read_text())
        assert detail["simulator"] == "embedding"
        res = loads(score_path(out, e["hookpoint"], e["unit"]).read_text())
        for s in res.scored_explanations[0].scored_simulation.scored_sequence_simulations:
            raw = s.simulation.uncalibrated_simulation.expected_activations
            assert all(0.0 <= v <= 10.0 + 1e-9 for v in raw)
            graded |= any(min(abs(v - w) for w in token_only) > 1e-6 for v in raw)
    assert graded, "the embedding similarity never changed a prediction"


# --- the forward pass stops at the deepest hookpoint ------------------------------------------


@pytest.mark.parametrize("hookpoint,must_not_run", [
    (HP0, ["transformer.h.1", "transformer.ln_f", "lm_head"]),
    (HP1, ["transformer.ln_f", "lm_head"]),
])
def test_record_never_runs_past_the_deepest_hookpoint(
        hookpoint: str, must_not_run: list[str], tiny_model: Path, corpus_file: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    load = models_mod.load_subject

    def spying_load(*args: Any, **kwargs: Any) -> Any:
        subject = load(*args, **kwargs)
        modules = dict(subject.model.named_modules())
        for name in [*must_not_run, hookpoint.rsplit(".mlp", 1)[0]]:
            modules[name].register_forward_pre_hook(
                lambda _m, _a, name=name: ran.append(name))
        return subject

    monkeypatch.setattr(models_mod, "load_subject", spying_load)
    info = record(RecordConfig(model=str(tiny_model), hookpoints=hookpoint,
                               corpus=str(corpus_file), **SMALL), tmp_path / "run")
    n_batches = -(-info["n_contexts"] // SMALL["batch_size"])
    layer = hookpoint.rsplit(".mlp", 1)[0]
    assert ran.count(layer) == n_batches  # the spy works: the hooked layer ran each batch
    assert not [n for n in ran if n in must_not_run]


# --- resume -------------------------------------------------------------------------------------


class CountingExplainer(explain_mod.TokenStatsExplainer):
    calls = 0

    async def explain(self, train: Any, background: Any) -> list[str]:
        type(self).calls += 1
        return await super().explain(train, background)


@pytest.fixture
def counters(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Counts explainer calls and records which (hookpoint, unit) each score_unit call scored."""
    scored: list[tuple[int, int]] = []
    original = pipeline.score_unit

    async def counting_score_unit(sim: Any, explanation: str, nr: Any, cfg: Any) -> Any:
        scored.append((nr.neuron_id.layer_index, nr.neuron_id.neuron_index))
        return await original(sim, explanation, nr, cfg)

    CountingExplainer.calls = 0
    monkeypatch.setitem(explain_mod.EXPLAINERS, "tokens", CountingExplainer)
    monkeypatch.setattr(pipeline, "score_unit", counting_score_unit)
    return {"scored": scored, "explainer": CountingExplainer}


@pytest.fixture
def fresh_run(cli_run: Path, tmp_path: Path) -> Path:
    """A private copy of the complete module run, to damage."""
    out = tmp_path / "run"
    shutil.copytree(cli_run, out)
    return out


def scored_units(run: Path) -> list[tuple[str, int]]:
    return [(e["hookpoint"], e["unit"]) for e in explained(run) if "explanation" in e]


def test_resume_recomputes_only_the_missing_units(fresh_run: Path, tiny_model: Path,
                                                  corpus_file: Path,
                                                  counters: dict[str, Any]) -> None:
    run = fresh_run
    before = tree(run, "scores")
    hp, unit = scored_units(run)[-1]
    score_path(run, hp, unit).unlink()
    assert cli.main([*run_argv(tiny_model, corpus_file, run), "--resume"]) == 0
    # Failed units are retried (a failure is not finished work); explained ones are not.
    n_failed = sum("failure" in e for e in explained(run))
    assert counters["explainer"].calls == n_failed
    assert counters["scored"] == [(layer_index(hp), unit)]
    assert tree(run, "scores") == before

    # An explanation lost too: explain and score only that unit again, stage by stage.
    hp, unit = scored_units(run)[0]
    explanation_path(run, hp, unit).unlink()
    score_path(run, hp, unit).unlink()
    counters["scored"].clear()
    assert cli.main(["explain", str(run), "--units", f"first:{N_UNITS}", "--resume"]) == 0
    assert counters["explainer"].calls == 2 * n_failed + 1
    assert cli.main(["score", str(run), "--simulator", "tokens", "--resume"]) == 0
    assert counters["scored"] == [(layer_index(hp), unit)]
    assert tree(run, "scores") == before


def test_interrupted_run_resumes_to_the_same_result(
        cli_run: Path, tiny_model: Path, corpus_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    original = pipeline.score_unit
    calls: list[int] = []

    async def interrupted(sim: Any, explanation: str, nr: Any, cfg: Any) -> Any:
        calls.append(nr.neuron_id.neuron_index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return await original(sim, explanation, nr, cfg)

    monkeypatch.setattr(pipeline, "score_unit", interrupted)
    assert cli.main(run_argv(tiny_model, corpus_file, out)) == 130
    assert "--resume" in capsys.readouterr().err
    assert len(list((out / "scores").glob("*/*.scores.json"))) == 2
    assert json.loads((out / "score.json").read_text())["complete"] is False

    # The unfinished score stage still guards its config: no mixing two simulators' scores.
    assert cli.main([*run_argv(tiny_model, corpus_file, out, simulator="embedding"),
                     "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "simulator" in err

    calls.clear()
    monkeypatch.setattr(pipeline, "score_unit", original)
    counting = []

    async def counted(sim: Any, explanation: str, nr: Any, cfg: Any) -> Any:
        counting.append(nr.neuron_id)
        return await original(sim, explanation, nr, cfg)

    monkeypatch.setattr(pipeline, "score_unit", counted)
    assert cli.main([*run_argv(tiny_model, corpus_file, out), "--resume"]) == 0
    assert len(counting) == len(scored_units(out)) - 2
    assert json.loads((out / "score.json").read_text())["complete"] is True
    assert tree(out, "scores") == tree(cli_run, "scores")
    assert tree(out, "explanations") == tree(cli_run, "explanations")


def test_interrupted_explain_stage_guards_its_config(
        fresh_run: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for d in ("explanations", "scores"):
        shutil.rmtree(fresh_run / d)
    for f in ("explain.json", "score.json"):
        (fresh_run / f).unlink()

    class Interrupted(explain_mod.TokenStatsExplainer):
        calls = 0

        async def explain(self, train: Any, background: Any) -> list[str]:
            type(self).calls += 1
            if type(self).calls == 3:
                raise KeyboardInterrupt
            return await super().explain(train, background)

    monkeypatch.setitem(explain_mod.EXPLAINERS, "tokens", Interrupted)
    assert cli.main(["explain", str(fresh_run), "--units", f"first:{N_UNITS}"]) == 130
    assert len(explained(fresh_run)) == 2
    ok_before = sum("explanation" in e for e in explained(fresh_run))
    capsys.readouterr()
    assert cli.main(["explain", str(fresh_run), "--units", f"first:{N_UNITS}", "--max-terms",
                     "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "max_terms" in err
    assert len(explained(fresh_run)) == 2
    Interrupted.calls = 10
    assert cli.main(["explain", str(fresh_run), "--units", f"first:{N_UNITS}", "--resume"]) == 0
    assert Interrupted.calls == 10 + 2 * N_UNITS - ok_before
    assert len(explained(fresh_run)) == 2 * N_UNITS


def test_rerun_without_resume_into_a_complete_folder_errors(
        fresh_run: Path, tiny_model: Path, corpus_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(fresh_run, "")
    assert cli.main(run_argv(tiny_model, corpus_file, fresh_run)) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuroscribe: error:") and "--resume" in err
    assert cli.main(["explain", str(fresh_run), "--units", f"first:{N_UNITS}"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert tree(fresh_run, "") == before


def test_a_different_run_is_refused_even_with_resume(
        fresh_run: Path, tiny_model: Path, corpus_file: Path,
        capsys: pytest.CaptureFixture[str], counters: dict[str, Any]) -> None:
    before = tree(fresh_run, "")
    for resume in ([], ["--resume"]):
        assert cli.main([*run_argv(tiny_model, corpus_file, fresh_run, max_tokens=2000),
                         *resume]) == 2
        err = capsys.readouterr().err
        assert "different run" in err and "max_tokens" in err
    # A later stage with another config is refused too.
    assert cli.main(["score", str(fresh_run), "--simulator", "tokens", "--no-calibrate",
                     "--resume"]) == 2
    assert "calibrate" in capsys.readouterr().err
    assert counters["scored"] == [] and counters["explainer"].calls == 0
    assert tree(fresh_run, "") == before


def test_score_unit_is_deterministic(cli_run: Path) -> None:
    """What the resume tests rely on: scoring the same unit twice gives the same numbers."""
    run = cli_run
    hp, unit = scored_units(run)[0]
    entry = json.loads(explanation_path(run, hp, unit).read_text())
    nr = RecordStore(run).neuron_record(hp, unit)
    cfg = ScoreConfig(simulator="tokens")
    sim = pipeline.make_simulator(cfg)
    a = asyncio.run(pipeline.score_unit(sim, entry["explanation"], nr, cfg))
    b = asyncio.run(pipeline.score_unit(sim, entry["explanation"], nr, cfg))
    assert a["scores"] == b["scores"]
    saved = json.loads(score_path(run, hp, unit, "scores").read_text())
    assert saved["scores"] == json.loads(json.dumps(a["scores"]))


def test_scorers_without_logprobs_in_the_score_stage(cli_run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``--scorers detection,embedding``: metrics on the valid and test records only, in each
    unit's scores file, the index and the summary; the LLM says 1 to every example."""
    from test_llm_explain import FakeBackend

    import neuroscribe.score.classify as classify
    from neuroscribe.llm.client import Client, LLMConfig, Request, Response

    seen: list[str] = []

    def reply(req: Request) -> Response:
        seen.append(req.messages[1][1])
        n = req.messages[1][1].count("\nExample ")
        return Response(text=json.dumps([1] * n), prompt_tokens=10, completion_tokens=n)

    fake = Client(FakeBackend(reply), LLMConfig(retries=0), None)
    monkeypatch.setattr(classify, "make_client", lambda cfg: fake)
    out = tmp_path / "run"
    shutil.copytree(cli_run, out, ignore=shutil.ignore_patterns(
        "scores", "score.json", "index.sqlite", "summary.json", "score_hist.png"))
    summary = score(ScoreConfig(simulator="tokens", scorers="detection,embedding",
                                  active_threshold=0.7, classify_negatives="weak"), out)
    store = RecordStore(out)
    checked, shown_ok = 0, set()
    for e in explained(out):
        if "explanation" not in e:
            continue
        detail = json.loads(score_path(out, e["hookpoint"], e["unit"], "scores").read_text())
        nr = store.neuron_record(e["hookpoint"], e["unit"])
        tops = [r for s in ("valid", "test") for r in nr.top_split(s)]
        rand = [r for s in ("valid", "test") for r in nr.random_split(s)]
        shown_ok |= {"".join(r.tokens) for r in tops + rand}
        pos = [r for r in tops if max(r.activations) > 0]
        det, emb = detail["classification"]["detection"], detail["classification"]["embedding"]
        if not pos:
            assert "failure" in det
            continue
        peak = max(max(r.activations) for r in pos)
        neg = [r for r in rand if max(r.activations) < 0.7 * peak]  # --classify-negatives weak
        if not neg:
            assert "failure" in det
            continue
        assert (det["n"], det["n_active"]) == (len(pos) + len(neg), len(pos))
        # answering 1 to everything: chance, and F1 from the counts
        assert det["balanced_accuracy"] == 0.5
        assert det["f1"] == pytest.approx(2 * len(pos) / (2 * len(pos) + len(neg)), abs=1e-6)
        assert 0.0 <= emb["auroc"] <= 1.0
        checked += 1
    assert checked >= 1
    shown = {json.loads(m) for p in seen for m in re.findall(r"^Example \d+: (.*)$", p, re.M)}
    assert shown and shown <= shown_ok  # only valid and test records reach the LLM
    assert summary["classification"]["detection_balanced_accuracy"]["mean"] == 0.5
    stage = json.loads((out / "score.json").read_text())
    assert stage["llm_usage"]["score"]["calls"] == len(seen)


def test_program_simulator_in_the_score_stage(cli_run: Path, tmp_path: Path) -> None:
    """``--simulator program``: one code-writing call per unit, the code saved with the unit's
    scores, and the simulation it gives (10 on the first quoted token) scored as usual."""
    from test_llm_explain import FakeBackend

    from neuroscribe.llm.client import Client, LLMConfig, Request, Response
    from neuroscribe.simulate.core import SimulateConfig
    from neuroscribe.simulate.program import ProgramSimulator

    def reply(req: Request) -> Response:
        word = re.findall(r'"([^"]+)"', req.messages[-1][1])[0]
        code = (f"def activation(tokens):\n    return [10.0 if t.strip().lower() == {word!r} "
                "else 0.0 for t in tokens]")
        return Response(text=f"```python\n{code}\n```", prompt_tokens=100, completion_tokens=30)

    out = tmp_path / "run"
    shutil.copytree(cli_run, out, ignore=shutil.ignore_patterns(
        "scores", "score.json", "index.sqlite", "summary.json", "score_hist.png"))
    cfg = ScoreConfig(simulator="program", calibrate=False)  # saved values = program output
    sim = ProgramSimulator(SimulateConfig(simulator="program"),
                           Client(FakeBackend(reply), LLMConfig(retries=0), None))
    try:
        score(cfg, out, sim=sim)
    finally:
        sim.close()
    units = [e for e in explained(out) if '"' in e.get("explanation", "")]
    assert units
    for e in units:
        detail = json.loads(score_path(out, e["hookpoint"], e["unit"], "scores").read_text())
        word = re.findall(r'"([^"]+)"', e["explanation"])[0]
        assert detail["simulator"] == "program" and repr(word) in detail["program"]
        # the saved simulations are the program's output: 10 exactly on that word
        saved = json.loads(score_path(out, e["hookpoint"], e["unit"]).read_text())
        seqs = saved["scored_explanations"][0]["scored_simulation"]["scored_sequence_simulations"]
        assert seqs
        for seq in seqs:
            sim_ = seq["simulation"]
            assert sim_["expected_activations"] == [
                10.0 if t.strip().lower() == word else 0.0 for t in sim_["tokens"]]
    assert len(sim.client.backend.requests) == len({e["explanation"] for e in units})
    assert sim.stats["programs"] == len({e["explanation"] for e in units})


def test_more_records_per_split_than_recorded_is_an_error(cli_run: Path, tmp_path: Path) -> None:
    """--n-per-split beyond what was recorded (SMALL: 12 top = 4 splits x 3, 9 random = 3 x 3)
    stops the explain and score stages with a message, rather than splits silently smaller."""
    from neuroscribe.errors import UserError

    hp, unit = scored_units(cli_run)[0]
    nr = RecordStore(cli_run).neuron_record(hp, unit)
    assert len(nr.most_positive_activation_records) == 12 and len(nr.random_sample) == 9
    cfg = ScoreConfig(simulator="tokens", n_per_split=3)  # exactly what there is: fine
    assert "scores" in asyncio.run(pipeline.score_unit(pipeline.make_simulator(cfg), "x", nr,
                                                       cfg))
    cfg = ScoreConfig(simulator="tokens", n_per_split=4)
    with pytest.raises(UserError, match=r"asked for 4 top-activating records per split "
                                        r"\(16 for the 4 splits .*\) but only 12 exist"):
        asyncio.run(pipeline.score_unit(pipeline.make_simulator(cfg), "x", nr, cfg))
    out = tmp_path / "run"
    shutil.copytree(cli_run, out, ignore=shutil.ignore_patterns(
        "explanations", "explain.json", "scores", "score.json", "index.sqlite", "summary.json",
        "score_hist.png"))
    with pytest.raises(UserError, match=r"layer [01] unit 0: asked for 4 top-activating "
                                        "records per split"):
        explain(ExplainConfig(units="first:1", n_per_split=4), out)
