"""The program simulator: prompt, code extraction, value coercion, the sandboxed run, repairs,
failures and the puzzle check's handling of an explanation it cannot simulate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_llm_explain import client

from neuroscribe.formats import ActivationRecord
from neuroscribe.groundtruth.puzzles import Puzzle, rank_explanations
from neuroscribe.llm.client import Request, Response
from neuroscribe.prompts import load
from neuroscribe.simulate.core import SIMULATORS, SimulateConfig, SimulationError
from neuroscribe.simulate.program import (
    ProgramSimulator,
    coerce_values,
    extract_code,
    program_messages,
)

AFTER_OF = ("```python\ndef activation(tokens):\n    return [10.0 if i and tokens[i - 1].strip()"
            " == 'of' else 0.0 for i in range(len(tokens))]\n```")
BROKEN = ("```python\ndef activation(tokens):\n    return [tokens[i + 1] and 1 for i in "
          "range(len(tokens))]\n```")


def test_program_prompt_exact() -> None:
    msgs = program_messages('the word after "of"')
    t = load("program")
    assert [role for role, _ in msgs] == ["system"] + ["user", "assistant"] * 5 + ["user"]
    assert msgs[0][1] == t["system"]
    assert msgs[1][1] == ('Explanation: the main thing this neuron does is find the word "and" '
                          'and nothing else')
    assert msgs[2][1] == ('```python\ndef activation(tokens):\n    return [10.0 if '
                          't.strip().lower() == "and" else 0.0 for t in tokens]\n```')
    assert msgs[-1][1] == 'Explanation: the main thing this neuron does is find the word after "of"'


def test_program_prompt_repair_turns_show_code_and_error() -> None:
    msgs = program_messages("x", [("def activation(tokens): pass", "it broke")])
    probe = json.dumps(load("program")["probe"], ensure_ascii=False)
    assert msgs[-2] == ("assistant", "```python\ndef activation(tokens): pass\n```")
    assert msgs[-1] == ("user", f"The code failed on the test text {probe}: it broke\n"
                                "Reply with the corrected code block only.")


def test_few_shot_programs_run_on_the_probe() -> None:
    # Every few-shot answer must itself be a working program (one value per probe token).
    t = load("program")
    for ex in t["examples"]:
        ns: dict[str, object] = {}
        exec(ex["code"], ns)  # noqa: S102 - our own data file
        out = ns["activation"](list(t["probe"]))  # type: ignore[operator]
        assert coerce_values(out, len(t["probe"])) == (out, "")


def test_extract_code() -> None:
    assert extract_code("Sure:\n```python\ndef activation(t):\n    return []\n```\nok") == \
        "def activation(t):\n    return []"
    cut = "```\ndef activation(t):\n    return ["
    assert extract_code(cut) == "def activation(t):\n    return ["
    assert extract_code("def activation(t): return []") == "def activation(t): return []"
    with pytest.raises(SimulationError, match="defines no function activation"):
        extract_code("```python\ndef f(t):\n    return []\n```")


def test_coerce_values() -> None:
    assert coerce_values([0, 10, 3.5], 3) == ([0.0, 10.0, 3.5], "")
    assert coerce_values([None, 12, -1, True], 4) == (
        [0.0, 10.0, 0.0, 1.0], "None or NaN as 0; clamped to 0-10")
    assert coerce_values([5], 3) == ([5.0, 0.0, 0.0], "1 values for 3 tokens")
    assert coerce_values([1, 2, 3], 2) == ([1.0, 2.0], "3 values for 2 tokens")
    with pytest.raises(SimulationError, match="not a list"):
        coerce_values(7, 1)
    with pytest.raises(SimulationError, match="holding str"):
        coerce_values(["a"], 1)


def _sim(tmp_path: Path, reply: Callable[[Request], Response], **kw: object) -> ProgramSimulator:
    cfg = SimulateConfig(simulator="program", **kw)  # type: ignore[arg-type]
    return ProgramSimulator(cfg, client(tmp_path, reply))


def test_program_simulates_records_exactly_and_writes_once(tmp_path: Path) -> None:
    sim = _sim(tmp_path, lambda req: Response(text=AFTER_OF, completion_tokens=40))
    seqs = [["I", " had", " enough", " of", " your", " nonsense"], [" of", " of", " cats"]]
    try:
        got = asyncio.run(sim.simulate_many('positions following "of"', seqs))
        again = asyncio.run(sim.simulate('positions following "of"', [" one", " of", " us"]))
    finally:
        sim.close()
    assert [s.expected_activations for s in got] == [[0, 0, 0, 0, 10, 0], [0, 10, 10]]
    assert again.expected_activations == [0, 0, 10]
    assert len(sim.client.backend.requests) == 1  # one program per explanation
    assert sim.stats["programs"] == 1 and sim.stats["exact"] == 3


def test_program_failing_on_probe_is_repaired_with_its_error(tmp_path: Path) -> None:
    replies = iter([BROKEN, AFTER_OF])
    sim = _sim(tmp_path, lambda req: Response(text=next(replies)))
    try:
        got = asyncio.run(sim.simulate("x", [" of", " it"]))
    finally:
        sim.close()
    assert got.expected_activations == [0, 10]
    second = sim.client.backend.requests[1].messages
    assert "IndexError" in second[-1][1] and second[-2][1].startswith("```python")
    assert sim.stats["repaired programs"] == 1


def test_program_that_never_works_is_a_failure_with_reason(tmp_path: Path) -> None:
    sim = _sim(tmp_path, lambda req: Response(text="I cannot write code."), program_repairs=1)
    try:
        with pytest.raises(SimulationError, match="no working program after 2 tries"):
            asyncio.run(sim.simulate("x", ["a"]))
        with pytest.raises(SimulationError):  # the failure is kept: no second round of calls
            asyncio.run(sim.simulate("x", ["b"]))
    finally:
        sim.close()
    assert len(sim.client.backend.requests) == 2 and sim.stats["failed"] == 1


def test_program_that_hangs_on_a_record_is_stopped(tmp_path: Path) -> None:
    code = ("```python\ndef activation(tokens):\n    while tokens and tokens[0] == 'loop':\n"
            "        pass\n    return [0.0] * len(tokens)\n```")
    sim = _sim(tmp_path, lambda req: Response(text=code), program_timeout=1.0)
    try:
        assert asyncio.run(sim.simulate("x", ["a", "b"])).expected_activations == [0, 0]
        with pytest.raises(SimulationError, match="timeout"):
            asyncio.run(sim.simulate("x", ["loop"]))
        # the sandbox restarts: the next call works again
        assert asyncio.run(sim.simulate("x", ["c"])).expected_activations == [0]
    finally:
        sim.close()


def test_program_is_registered() -> None:
    assert SIMULATORS["program"] is ProgramSimulator


def test_puzzle_rank_scores_a_failed_explanation_last(tmp_path: Path) -> None:
    def reply(req: Request) -> Response:
        return Response(text=AFTER_OF if "following" in req.messages[-1][1] else "no code")

    sim = _sim(tmp_path, reply, program_repairs=0)
    puzzle = Puzzle("of", 'positions following "of"', ["the word \"of\""],
                    [ActivationRecord([" of", " your", " cat"], [0.0, 10.0, 0.0]),
                     ActivationRecord([" all", " of", " us"], [0.0, 0.0, 9.0])])
    failures: dict[str, str] = {}
    try:
        scores = asyncio.run(rank_explanations(sim, puzzle, failures))
    finally:
        sim.close()
    assert scores[0] > 0.99 and scores[1] == -1.0
    assert list(failures) == ['the word "of"']
    assert "no function activation" in failures['the word "of"']


def test_cut_off_program_is_resampled_with_a_penalty(tmp_path: Path) -> None:
    replies = iter([Response(text="```python\nWORDS = {'a', 'a', 'a',", completion_tokens=300),
                    Response(text=AFTER_OF, completion_tokens=40)])
    sim = _sim(tmp_path, lambda req: next(replies))
    try:
        assert asyncio.run(sim.simulate("x", [" of", " it"])).expected_activations == [0, 10]
    finally:
        sim.close()
    first, second = sim.client.backend.requests
    assert (first.temperature, first.seed, first.frequency_penalty) == (0.0, 0, 0.3)
    assert (second.temperature, second.seed) == (0.7, 1)
    assert "cut off at 300 tokens" in second.messages[-1][1]


def test_request_key_ignores_an_unset_frequency_penalty() -> None:
    # Keys of requests cached before the field existed must not change.
    import dataclasses
    import hashlib

    req = Request(messages=(("user", "hi"),), max_tokens=5)
    newer = ("stage", "frequency_penalty", "segments", "values", "fill")
    old = {k: v for k, v in dataclasses.asdict(req).items() if k not in newer}
    raw = json.dumps(["p", "m", old], sort_keys=True, ensure_ascii=False)
    assert req.key("p", "m") == hashlib.sha256(raw.encode()).hexdigest()
    assert dataclasses.replace(req, frequency_penalty=0.3).key("p", "m") != req.key("p", "m")
    for field, value in (("segments", ("a\t",)), ("values", ("0",)), ("fill", "0")):
        assert dataclasses.replace(req, **{field: value}).key("p", "m") != req.key("p", "m")


def test_llama_check_reports_a_crashing_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import neuroscribe.llm.backends as llm_backends

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llm_backends, "CHECK", "import os; os.abort()")
    assert llm_backends.check_llama(str(gguf)) == 1
    assert "Rebuild it for this CPU" in capsys.readouterr().err
    monkeypatch.setattr(llm_backends, "CHECK", "print('ok')")
    assert llm_backends.check_llama(str(gguf)) == 0


def test_puzzle_check_reports_programs_and_failures(tmp_path: Path) -> None:
    from neuroscribe.groundtruth.puzzles import PuzzleConfig, check

    raw = {"of": {"name": "of", "explanation": 'positions following "of"',
                  "false_explanations": ["common words"],
                  "sentences": [[" of", [" your", 10], " cat"], [" all", " of", [" us", 9]]]}}
    path = tmp_path / "puzzles.json"
    path.write_text(json.dumps(raw))

    def reply(req: Request) -> Response:
        return Response(text=AFTER_OF if "following" in req.messages[-1][1] else "no code")

    sim = _sim(tmp_path, reply, program_repairs=0)
    try:
        report = check(PuzzleConfig(puzzles=str(path), simulators="program", explainers="",
                                    out=str(tmp_path / "out")), lambda name: sim, None)
    finally:
        sim.close()
    got = report["scorer"]["program"]
    assert got["true_ranks_first"] == 1 and got["scores"]["of"][1] == -1.0
    assert got["programs"] == {'positions following "of"': extract_code(AFTER_OF),
                               "common words": None}
    assert list(got["failures"]) == ["common words"]
