"""Exact strings of every prompt builder for tiny inputs.

Structure (lines, separators, numbering, normalised values, marks) is written out literally
here; only the long system prose is taken from the template files.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest

import neuroscribe.prompts as prompts
from neuroscribe.formats import ActivationRecord
from neuroscribe.prompts import FewShotNeuron

PREFIX = "the main thing this neuron does is find"
SHOT = FewShotNeuron(
    explanation="odd things",
    records=(ActivationRecord(["a", " b"], [0.0, 2.0]),),
    negatives=(ActivationRecord(["c"], [0.0]),))


def test_format_records_floor_ceil_and_zeros() -> None:
    recs = [ActivationRecord(["x", " y"], [0.35, 1.0]), ActivationRecord([" z"], [-0.5])]
    assert prompts.format_records(recs, 1.0, "floor") == (
        "\n<start>\nx\t3\n y\t10\n<end>\n<start>\n z\t0\n<end>\n")
    assert prompts.format_records(recs, 1.0, "ceil") == (
        "\n<start>\nx\t4\n y\t10\n<end>\n<start>\n z\t0\n<end>\n")
    assert prompts.format_records(recs, 1.0, "floor", omit_zeros=True) == (
        "\n<start>\nx\t3\n y\t10\n<end>\n<start>\n\n<end>\n")
    assert prompts.format_unknown([["{a}", " b"]]) == (
        "\n<start>\n{a}\tunknown\n b\tunknown\n<end>\n")
    assert prompts.nonzero_proportion(recs, 1.0) == pytest.approx(2 / 3)


def test_openai_explain_messages() -> None:
    target = [ActivationRecord(["x", " y", " z", " w", " v", " u"],
                               [0.0, 0.0, 3.0, 0.0, -1.0, 0.0])]
    system = prompts.load("openai")["explain"]["system"]
    assert prompts.openai_explain_messages(target, "floor", [SHOT]) == (
        ("system", system),
        ("user", "\n\nNeuron 1\nActivations:\n<start>\na\t0\n b\t10\n<end>\n"
                 f"\nExplanation of neuron 1 behavior: {PREFIX}"),
        ("assistant", " odd things."),
        ("user", "\n\nNeuron 2\nActivations:\n<start>\nx\t0\n y\t0\n z\t10\n w\t0\n v\t0\n"
                 " u\t0\n<end>\n"
                 "\nSame activations, but with all zeros filtered out:\n<start>\n z\t10\n<end>\n"
                 f"\nExplanation of neuron 2 behavior: {PREFIX}"),
    )


def test_openai_explain_uses_the_configured_normalization() -> None:
    target = [ActivationRecord(["p", " q"], [0.35, 1.0])]
    floor = prompts.openai_explain_messages(target, "floor", [])
    ceil = prompts.openai_explain_messages(target, "ceil", [])
    assert floor[1][1] == ("\n\nNeuron 1\nActivations:\n<start>\np\t3\n q\t10\n<end>\n"
                           f"\nExplanation of neuron 1 behavior: {PREFIX}")
    assert ceil[1][1] == floor[1][1].replace("p\t3", "p\t4")


def test_highlight_text_marks_runs_and_keeps_spaces_outside() -> None:
    rec = ActivationRecord(["The", " big", " cat", " sat", "\n", " ", "!"],
                           [0.0, 5.0, 6.0, 0.0, 0.0, 6.0, 0.0])
    assert prompts.highlight_text(rec, 6.0, "floor", 5) == "The <<big cat>> sat\\n<< >>!"
    assert prompts.highlight_text(rec, 6.0, "floor", 10) == "The big <<cat>> sat\\n<< >>!"
    assert prompts.highlight_text(rec, 6.0, "floor", 11) == "The big cat sat\\n !"


def test_highlight_explain_messages() -> None:
    target = [ActivationRecord(["The", " big", " cat", " sat", "\n"], [0.0, 5.0, 6.0, 0.0, 0.0]),
              ActivationRecord([" cat", "!"], [3.0, 0.0])]
    t = prompts.load("highlight")
    assert prompts.highlight_explain_messages(target, "floor", 5, [SHOT]) == (
        ("system", t["system"]),
        ("user", "Excerpts where the neuron fires:\n1. a <<b>>\n\nWhat does the neuron find?"),
        ("assistant", "Explanation: odd things"),
        ("user", "Excerpts where the neuron fires:\n1. The <<big cat>> sat\\n\n2.  <<cat>>!\n"
                 "\nWhat does the neuron find?"),
    )


def test_summary_explain_messages_count_the_marked_tokens() -> None:
    target = [ActivationRecord(["The", " big", " cat", " sat", "\n"], [0.0, 5.0, 6.0, 0.0, 6.0]),
              ActivationRecord([" cat", "!"], [6.0, 0.0])]
    t = prompts.load("highlight")
    assert prompts.summary_explain_messages(target, "floor", 5, [SHOT]) == (
        ("system", t["system"] + t["summary_system"]),
        ("user", "Excerpts where the neuron fires:\n1. a <<b>>\n"
                 '\nMarked tokens, most frequent first: "b" x1\n\nWhat does the neuron find?'),
        ("assistant", "Explanation: odd things"),
        ("user", "Excerpts where the neuron fires:\n1. The <<big cat>> sat<<\\n>>\n"
                 "2.  <<cat>>!\n"
                 '\nMarked tokens, most frequent first: "cat" x2, "big" x1\n'
                 "\nWhat does the neuron find?"),
    )


def test_marked_facts_name_the_previous_token_and_the_form_only_when_they_stand_out() -> None:
    # Four marked tokens, all right after "the" and all capitalised; unmarked tokens rarely
    # follow "the" or start with a capital letter.
    recs = [ActivationRecord(["I", " saw", " the", " Owl", " and", " the", " Fox", " go"],
                             [0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 6.0, 0.0]),
            ActivationRecord([" then", " the", " Bear", " met", " the", " Deer", " here"],
                             [0.0, 0.0, 6.0, 0.0, 0.0, 4.0, 0.0])]
    assert prompts.marked_facts(recs, 6.0, "floor", 5) == [
        'All 4 marked tokens come right after "the".',
        "All 4 marked tokens start with a capital letter."]
    # Four of five: the counted wording; below min_count (4) or min_share (0.7): nothing.
    most = [ActivationRecord([" the", " owl", " the", " fox", " the", " elk", " the", " emu",
                              " a", " yak"], [0.0, 6.0, 0.0, 6.0, 0.0, 6.0, 0.0, 6.0, 0.0, 6.0])]
    assert prompts.marked_facts(most, 6.0, "floor", 5) == [
        '4 of the 5 marked tokens come right after "the".']
    assert prompts.marked_facts([recs[0]], 6.0, "floor", 5) == []
    half = [ActivationRecord([" the", " Owl", " the", " Fox", " a", " Elk", " a", " Yak"],
                             [0.0, 6.0, 0.0, 6.0, 0.0, 6.0, 0.0, 6.0])]
    assert prompts.marked_facts(half, 6.0, "floor", 5) == ["All 4 marked tokens start with a "
                                                          "capital letter."]
    # A fact as common among the unmarked tokens (min_ratio 3) is not a fact about the unit.
    plain = [ActivationRecord([" The", " Owl", " Fox", " Elk", " Yak", " Ant", " Bee"],
                              [0.0, 6.0, 6.0, 6.0, 6.0, 0.0, 0.0])]
    assert prompts.marked_facts(plain, 6.0, "floor", 5) == []
    assert prompts.marked_facts([], 1.0, "floor", 1) == []


def test_summary_prompt_adds_the_facts_after_the_counts() -> None:
    recs = [ActivationRecord(["I", " saw", " the", " Owl", " and", " the", " Fox", " go"],
                             [0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 6.0, 0.0]),
            ActivationRecord([" then", " the", " Bear", " met", " the", " Deer", " here"],
                             [0.0, 0.0, 6.0, 0.0, 0.0, 4.0, 0.0])]
    msgs = prompts.summary_explain_messages(recs, "floor", 4, [])
    assert msgs[-1][1].endswith(
        '\nMarked tokens, most frequent first: "Bear" x1, "Deer" x1, "Fox" x1, "Owl" x1\n'
        'All 4 marked tokens come right after "the".\n'
        "All 4 marked tokens start with a capital letter.\n\nWhat does the neuron find?")
    # The highlight prompt of the same records has neither counts nor facts.
    assert "right after" not in prompts.highlight_explain_messages(recs, "floor", 4, [])[-1][1]


def test_category_prompt_shows_only_the_marked_tokens_with_an_excerpt() -> None:
    target = [ActivationRecord(["I", " saw", " the", " big", " cat", " and", " a", " dog", "."],
                               [0.0, 0.0, 0.0, 0.0, 6.0, 0.0, 0.0, 5.0, 0.0]),
              ActivationRecord([" cat", "!"], [6.0, 0.0])]
    t = prompts.load("category")
    assert prompts.category_explain_messages(target, "floor", 5, [SHOT]) == (
        ("system", t["system"]),
        ("user", "Tokens where the neuron fires, most frequent first:\n"
                 '"b" x1, as in: ...a <<b>>...\n\nWhat kind of token are they?'),
        ("assistant", "Explanation: odd things"),
        ("user", "Tokens where the neuron fires, most frequent first:\n"
                 '"cat" x2, as in: ...I saw the big <<cat>> and a...\n'
                 '"dog" x1, as in: ...big <<cat>> and a <<dog>>....\n'
                 "\nWhat kind of token are they?"),
    )
    # A unit that fires on newlines still has its tokens listed (escaped as in the excerpts).
    newline = [ActivationRecord(["Hi", "\n", "Bye", "\n"], [0.0, 6.0, 0.0, 5.0])]
    assert prompts.category_explain_messages(newline, "floor", 5, [])[-1][1] == (
        "Tokens where the neuron fires, most frequent first:\n"
        '"\\n" x2, as in: ...Hi<<\\n>>Bye<<\\n>>...\n\nWhat kind of token are they?')
    # By default the few-shot neurons are those of category_examples.json.
    msgs = prompts.category_explain_messages(target)
    assert [m[1] for m in msgs if m[0] == "assistant"] == [
        f"Explanation: {n.explanation}" for n in prompts.few_shot_neurons("category_examples")]


def test_with_facts_appends_the_facts_as_phrases() -> None:
    recs = [ActivationRecord(["I", " saw", " the", " Owl", " and", " the", " Fox", " go"],
                             [0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 6.0, 0.0]),
            ActivationRecord([" then", " the", " Bear", " met", " the", " Deer", " here"],
                             [0.0, 0.0, 6.0, 0.0, 0.0, 4.0, 0.0])]
    assert prompts.with_facts("animals", recs, "floor", 4) == (
        'animals, right after "the", starting with a capital letter')
    # Below min_count (4 marked tokens) no fact holds: the category alone.
    assert prompts.with_facts("animals", [recs[0]], "floor", 4) == "animals"


def test_summary_few_shot_neurons_avoid_the_planted_concepts() -> None:
    """The summary explainer is the one bench-planted reports, so its examples must not teach
    a planted concept: no example marks a token that a planted concept's matcher accepts, in
    the packaged concepts or in the held-out ones."""
    from neuroscribe.groundtruth.planted import load_concepts

    summary = prompts.few_shot_neurons("summary_examples")
    assert len(summary) == 5
    shots = summary + prompts.few_shot_neurons("category_examples")
    heldout = resources.files("neuroscribe").joinpath("data/planted/heldout_concepts.json")
    concepts = load_concepts() + load_concepts(str(heldout))
    assert len(concepts) == 40
    for shot in shots:
        for rec in shot.records:
            hot = [act >= 0.5 * max(rec.activations) for act in rec.activations]
            for c in concepts:
                hits = [t for t, h, f in zip(rec.tokens, hot, c.fires(rec.tokens)) if h and f]
                assert not hits, (shot.explanation, c.name, hits)
    msgs = prompts.summary_explain_messages([ActivationRecord(["x"], [1.0])])
    assert [m[1] for m in msgs if m[0] == "assistant"] == [
        f"Explanation: {s.explanation}" for s in summary]
    # The second example shows a fact line, so the prompt demonstrates one.
    assert 'come right after "to"' in msgs[3][1]


def test_contrastive_explain_messages() -> None:
    target = [ActivationRecord([" cat", "!"], [3.0, 0.0])]
    negatives = [ActivationRecord([" dog", " ran"], [0.0, 9.0])]  # shown as plain text
    t = prompts.load("highlight")
    assert prompts.contrastive_explain_messages(target, negatives, "ceil", 1, [SHOT]) == (
        ("system", t["system"] + t["contrastive_system"]),
        ("user", "Excerpts where the neuron fires:\n1. a <<b>>\n"
                 "\nExcerpts where the neuron does not fire:\n1. c\n"
                 "\nWhat does the neuron find?"),
        ("assistant", "Explanation: odd things"),
        ("user", "Excerpts where the neuron fires:\n1.  <<cat>>!\n"
                 "\nExcerpts where the neuron does not fire:\n1.  dog ran\n"
                 "\nWhat does the neuron find?"),
    )


def test_openai_simulate_prompt_is_one_raw_string() -> None:
    system = prompts.load("openai")["simulate"]["system"]
    assert prompts.openai_simulate_prompt(" cats ", [" the", "{cat}"], [SHOT]) == (
        system
        + f"\n\nNeuron 1\nExplanation of neuron 1 behavior: {PREFIX} odd things"
        + "\nActivations: \n<start>\na\t0\n b\t10\n<end>\n\n"
        + f"\n\nNeuron 2\nExplanation of neuron 2 behavior: {PREFIX} cats"
        + "\nActivations: \n<start>\n the\tunknown\n{cat}\tunknown\n<end>\n")


def test_json_simulate_messages() -> None:
    system = prompts.load("json_simulate")["system"]
    assert prompts.json_simulate_messages("cats", [" the", "\n"], [SHOT]) == (
        ("system", system),
        ("user", f"Explanation: {PREFIX} odd things\nTokens (2):\n0\t\"a\"\n1\t\" b\"\n"
                 "Reply with a JSON list of 2 integers from 0 to 10."),
        ("assistant", "[0, 10]"),
        ("user", f"Explanation: {PREFIX} cats\nTokens (2):\n0\t\" the\"\n1\t\"\\n\"\n"
                 "Reply with a JSON list of 2 integers from 0 to 10."),
    )


def test_default_few_shot_examples_are_well_formed() -> None:
    shots = prompts.few_shot_neurons()
    assert len(shots) == 5
    for shot in shots:
        assert shot.explanation and not shot.explanation.endswith(".")
        for rec in (*shot.records, *shot.negatives):
            assert len(rec.tokens) == len(rec.activations)
        assert all(max(r.activations) > 0 for r in shot.records)
        assert all(max(r.activations) == 0 for r in shot.negatives)
    target = [ActivationRecord(["x"], [1.0])]
    assert len(prompts.openai_explain_messages(target)) == 2 + 2 * len(shots)
    assert len(prompts.contrastive_explain_messages(target, [])) == 2 + 2 * len(shots)
    assert prompts.openai_simulate_prompt_many("e", [["x"]], reveal=False).count(
        "\tunknown") == 1
    hidden = sum(min(k, len(r.tokens)) for s in shots
                 for k, r in zip(s.first_revealed, s.records))
    assert hidden > 0  # OpenAI's few-shot format: tokens before the first revealed one
    assert prompts.openai_simulate_prompt("e", ["x"]).count("\tunknown") == 1 + hidden
    # Every template file is valid JSON with a description.
    for name in ("common", "openai", "highlight", "json_simulate", "cleaning", "examples",
                 "summary_examples", "category", "category_examples"):
        assert json.loads(json.dumps(prompts.load(name)))["description"]
