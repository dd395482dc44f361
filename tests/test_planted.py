"""Planted neurons on the tiny GPT-2: the hook fires where the rule says, recording sees it,
and the recovery judges tell a matching explanation from a distractor."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import neuroscribe.cli as cli
from neuroscribe.errors import UserError
from neuroscribe.groundtruth.judge import EmbeddingJudge, llm_verdict
from neuroscribe.groundtruth.planted import PlantedConfig, interleave_corpus, load_concepts, plant
from neuroscribe.llm.client import LLMError, Request, Response

HP = "transformer.h.0.mlp.act"
CONCEPTS = {"concepts": [
    {"name": "colour", "description": "colour words such as red, green and blue",
     "distractors": ["names of animals such as cat and bird", "words about the sea and ships"],
     "token": {"words": ["red", "green", "blue"]}},
    {"name": "after_the", "description": "the word that comes right after \"the\"",
     "distractors": ["the definite article \"the\"", "punctuation at the end of a sentence"],
     "token": {"regex": "^ ?[A-Za-z]+$"}, "previous": {"words": ["the"]}},
    {"name": "sentence_end", "description": "sentence-ending punctuation: full stops, question "
     "marks and exclamation marks", "distractors": ["colour words", "commas"],
     "token": {"regex": "^ ?[.!?]+$"}},
]}
TEXT = "the cat sat on the mat while red birds sang. the ships said that the blue ships came!"


@pytest.fixture(scope="module")
def concepts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("planted") / "concepts.json"
    path.write_text(json.dumps(CONCEPTS))
    return path


@pytest.fixture(scope="module")
def subject(tiny_model: Path) -> Any:
    from neuroscribe.models import load_subject

    return load_subject(str(tiny_model))


def hookpoint_output(subject: Any, text: str) -> tuple[Any, list[str]]:
    import torch

    from neuroscribe.models import capture, run_to_hooks

    ids = subject.tokenizer(text, return_tensors="pt")["input_ids"]
    with capture(subject.model, [HP]) as store, torch.inference_mode():
        acts = run_to_hooks(subject.model, ids, store)[HP][0]
    vocab = subject.token_strings()
    return acts, [vocab[i] for i in ids[0].tolist()]


def test_rules_follow_the_definition(concepts_file: Path) -> None:
    colour, after_the, end = load_concepts(str(concepts_file))
    toks = ["the", " Red", " cat", " the", " blue", ".", "the"]
    assert colour.fires(toks) == [False, True, False, False, True, False, False]
    # The previous rule needs a preceding token in the same context: never at position 0.
    assert after_the.fires(toks) == [False, True, False, False, True, False, False]
    assert after_the.fires([" cat", " the", " cat"]) == [False, False, True]
    assert end.fires(toks) == [False, False, False, False, False, True, False]


def test_packaged_concepts_are_enough_and_well_formed() -> None:
    concepts = load_concepts()
    assert len(concepts) >= 20
    assert all(len(c.distractors) >= 2 and c.description not in c.distractors
               for c in concepts)
    months = next(c for c in concepts if c.name == "month")
    assert months.fires([" May", " may", " October"]) == [True, False, True]


def test_hook_fires_exactly_where_the_rule_says(subject: Any, concepts_file: Path) -> None:
    import torch

    concepts = load_concepts(str(concepts_file))
    before, toks = hookpoint_output(subject, TEXT)
    planting = plant(subject, HP, concepts, strength=3.0, seed=1)
    try:
        after, _ = hookpoint_output(subject, TEXT)
    finally:
        planting.remove()
    for unit, concept in zip(planting.units, concepts):
        want = torch.tensor(concept.fires(toks), dtype=torch.float32) * 3.0
        assert want.sum() > 0, concept.name  # the sentence exercises every rule
        assert torch.equal(after[:, unit], want), concept.name
    others = [u for u in range(before.shape[-1]) if u not in planting.units]
    assert torch.equal(after[:, others], before[:, others])  # nothing else changes
    restored, _ = hookpoint_output(subject, TEXT)
    assert torch.equal(restored, before)  # remove() takes the planting off


def test_recorded_planted_units_equal_the_rule(subject: Any, concepts_file: Path,
                                               corpus_file: Path, tmp_path: Path) -> None:
    from neuroscribe.record.core import RecordConfig, RecordStore, record

    concepts = load_concepts(str(concepts_file))
    planting = plant(subject, HP, concepts, strength=2.5, seed=0)
    cfg = RecordConfig(model="tiny", hookpoints=HP, corpus=str(corpus_file), max_tokens=2000,
                       ctx_len=32, batch_size=16, quantile_warmup=8, n_top=8, n_random=6,
                       n_quantile=1)
    try:
        record(cfg, tmp_path, subject=subject)
    finally:
        planting.remove()
    store = RecordStore(tmp_path)
    for unit, concept in zip(planting.units, concepts):
        nr = store.neuron_record(HP, unit)
        records = nr.most_positive_activation_records + nr.random_sample
        assert max(max(r.activations) for r in records) == 2.5
        for r in records:
            assert r.activations == [2.5 * f for f in concept.fires(r.tokens)], concept.name


def test_plant_refuses_bad_input(subject: Any, concepts_file: Path, tmp_path: Path) -> None:
    concepts = load_concepts(str(concepts_file))
    with pytest.raises(UserError, match="cannot plant"):
        plant(subject, HP, concepts * 30, strength=1.0)  # 90 neurons, 64 units
    with pytest.raises(UserError, match="unknown hookpoint"):
        plant(subject, "transformer.h.0.mlp.nope", concepts, strength=1.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"concepts": [{**CONCEPTS["concepts"][0],
                                             "token": {"glob": "*"}}]}))
    with pytest.raises(UserError, match="unknown matcher"):
        load_concepts(str(bad))


def test_embedding_judge_picks_the_truth_not_a_distractor(concepts_file: Path) -> None:
    concepts = load_concepts(str(concepts_file))
    judge = EmbeddingJudge(concepts, None)
    colour, after_the, _ = concepts
    good = judge('fires on the tokens "red", "blue", "green"', colour)
    assert good["recovered"] and good["nearest_concept"] == "colour"
    assert good["similarity_true"] > max(good["similarity_distractors"])
    bad = judge("names of animals such as cats, dogs and birds", colour)
    assert not bad["recovered"]
    assert judge("the word following the article the", after_the)["recovered"]


class FakeClient:
    def __init__(self, reply: Any) -> None:
        self.reply, self.requests = reply, []

    async def complete(self, req: Request) -> Response:
        self.requests.append(req)
        if isinstance(self.reply, Exception):
            raise self.reply
        return Response(text=self.reply(req))


def test_llm_judge_reads_the_chosen_option(concepts_file: Path) -> None:
    colour = load_concepts(str(concepts_file))[0]

    def number_of(text: str) -> Any:
        def reply(req: Request) -> str:
            line = next(ln for ln in req.messages[-1][1].splitlines() if ln.endswith(text))
            return f"{line.split('.')[0]}"
        return reply

    ok = asyncio.run(llm_verdict(FakeClient(number_of(colour.description)), "red", colour))
    assert ok == {"recovered": True, "choice": colour.description}
    wrong = asyncio.run(llm_verdict(FakeClient(number_of(colour.distractors[0])), "x", colour))
    assert not wrong["recovered"] and wrong["choice"] == colour.distractors[0]
    for client in (FakeClient(lambda _r: "I cannot tell"), FakeClient(LLMError("down"))):
        res = asyncio.run(llm_verdict(client, "red", colour))
        assert not res["recovered"] and res["failure"]


def test_bench_planted_cli_writes_report(tiny_model: Path, corpus_file: Path,
                                         concepts_file: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["bench-planted", "--out", str(out), "--model", str(tiny_model), "--corpus",
            str(corpus_file), "--hookpoints", HP, "--concepts", str(concepts_file),
            "--max-tokens", "3000", "--ctx-len", "32", "--batch-size", "16",
            "--quantile-warmup", "8", "--n-top", "12", "--n-random", "9", "--n-quantile", "1",
            "--simulator", "tokens"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "concept recovery (embedding judge)" in printed
    report = json.loads((out / "planted.json").read_text())
    assert report["complete"] and report["config"]["concepts"] == str(concepts_file)
    units = {u["concept"]: u for u in report["units"]}
    assert set(units) == {"colour", "after_the", "sentence_end"}
    # The token explainer names the colour tokens; the judge sees that it is the truth.
    assert '"red"' in units["colour"]["explanation"]
    assert units["colour"]["verdicts"]["embedding"]["recovered"]
    assert units["colour"]["valid_all_score"] is not None
    rec = report["recovery"]["embedding"]
    assert rec["n"] == 3 and rec["recovered"] == sum(
        u["verdicts"]["embedding"]["recovered"] for u in report["units"])
    assert rec["nearest_of_all"] == sum(u["verdicts"]["embedding"]["nearest_concept"]
                                        == u["concept"] for u in report["units"])
    assert rec["nearest_of_all"] >= 1  # the colour unit at least
    assert (out / "planted.txt").read_text().startswith("planted neurons: 3")
    explained = sorted(int(p.stem) for p in (out / "explanations").glob("*/*.json"))
    assert explained == sorted(int(u) for u in report["planting"]["units"])
    assert cli.main(argv) == 2  # the folder holds this run: refused without --resume
    assert cli.main([*argv, "--resume"]) == 0


def test_interleave_balances_files_by_characters(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a1\na2\n\na3\na4\na5\na6\n")
    b.write_text("bbbbbb1\nbbbbbb2\n")
    out = tmp_path / "run" / "corpus.txt"
    assert interleave_corpus(f"{a},{b}", out) == str(out)
    # Each next line comes from the file that has given the fewest characters so far.
    assert out.read_text().split() == ["a1", "bbbbbb1", "a2", "a3", "a4", "bbbbbb2", "a5", "a6"]
    assert interleave_corpus(str(a), tmp_path / "one.txt") == str(a)  # one file: as it is
    assert not (tmp_path / "one.txt").exists()


def test_bench_planted_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench-planted", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(PlantedConfig):
        assert "--" + f.name.replace("_", "-") in out
    assert all(flag in out for flag in ("--out", "--resume", "--explainer", "--corpus"))
