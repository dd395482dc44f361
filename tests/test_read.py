"""``neuroscribe read`` on the tiny GPT-2: planted units are read back where their rule fires,
and the CLI prints text and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import neuroscribe.cli as cli
from neuroscribe.explain.core import explanation_path
from neuroscribe.groundtruth.planted import load_concepts, plant
from neuroscribe.models import load_subject
from neuroscribe.pipeline import score_path
from neuroscribe.read.core import ReadConfig, read_text
from neuroscribe.runs import write_json

HP = "transformer.h.0.mlp.act"
CONCEPTS = {"concepts": [
    {"name": "article", "description": "the definite article",
     "distractors": ["names of animals"], "token": {"words": ["the"]}}]}
TEXT = "the cat sat on the mat while red birds sang. the blue ships came over the sea!"
EXPLAINED = range(8)  # a few ordinary units are explained too


@pytest.fixture(scope="module")
def planted_run(tiny_model: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[Path, Any, int]:
    from neuroscribe.record.core import RecordConfig, record

    tmp = tmp_path_factory.mktemp("read")
    (tmp / "concepts.json").write_text(json.dumps(CONCEPTS))
    subject = load_subject(str(tiny_model))
    planting = plant(subject, HP, load_concepts(str(tmp / "concepts.json")), strength=2.5)
    run = tmp / "run"
    record(RecordConfig(model=str(tiny_model), hookpoints=HP, corpus=str(corpus_file),
                        max_tokens=2000, ctx_len=32, batch_size=16, quantile_warmup=8,
                        n_top=6, n_random=4, n_quantile=1), run, subject=subject)
    (unit,) = planting.units
    for u in {*EXPLAINED, unit}:
        words = "the definite article" if u == unit else f"ordinary unit {u}"
        write_json(explanation_path(run, HP, u), {"hookpoint": HP, "unit": u,
                                                  "explanation": words})
        write_json(score_path(run, HP, u, "scores"),
                   {"scores": {"test_all": {"ev_correlation_score": 0.9 if u == unit else 0.1}}})
    return run, subject, unit


def test_read_lists_the_planted_unit_on_its_tokens(planted_run: tuple[Path, Any, int]) -> None:
    run, subject, unit = planted_run
    res = read_text(run, TEXT, ReadConfig(top=20), subject=subject)
    article = [i for i, t in enumerate(res["tokens"]) if t["token"] == " the"]
    assert len(article) == 3  # the tiny tokenizer splits the first "the" into "th", "e"
    for i, t in enumerate(res["tokens"]):
        units = {u["unit"] for u in t["units"]}
        assert (unit in units) == (i in article), t
        assert units <= {*EXPLAINED, unit}  # unexplained units stay out by default
    hit = next(u for t in res["tokens"] if t["token"] == " the" for u in t["units"]
               if u["unit"] == unit)
    assert hit["explanation"] == "the definite article" and hit["score"] == 0.9
    assert hit["activation"] == 2.5
    top = next(s for s in res["summary"] if s["unit"] == unit)
    assert top["n_tokens"] == 3 and res["summary"][0] == top


def test_all_units_shows_unexplained_ones(planted_run: tuple[Path, Any, int]) -> None:
    run, subject, _ = planted_run
    res = read_text(run, TEXT, ReadConfig(top=100, all_units=True, quantile=0.5),
                    subject=subject)
    shown = {u["unit"] for t in res["tokens"] for u in t["units"]}
    assert shown - {*EXPLAINED} and any(u["explanation"] is None for t in res["tokens"]
                                        for u in t["units"])


def test_cli_read_text_and_json(planted_run: tuple[Path, Any, int], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    run = planted_run[0]
    # the CLI loads the unplanted model: the planted unit no longer fires, ordinary ones may
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT)
    assert cli.main(["read", str(run), "--file", str(text_file), "--json",
                     "--quantile", "0.5"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "".join(t["token"] for t in res["tokens"]) == TEXT
    fired = [(i, u) for i, t in enumerate(res["tokens"]) for u in t["units"]]
    assert fired, "some ordinary unit passes its median boundary"
    assert cli.main(["read", str(run), TEXT, "--quantile", "0.5"]) == 0
    out = capsys.readouterr().out
    i, u = fired[0]
    assert f"{u['hookpoint']}#{u['unit']}" in out and u["explanation"] in out
    assert "\033[" not in out  # not a terminal: no colour
    assert cli.main(["read", str(run), TEXT, "--summary", "--quantile", "0.5"]) == 0
    assert capsys.readouterr().out.startswith("most active units over")
    assert cli.main(["read", str(run)]) == 2  # no text
