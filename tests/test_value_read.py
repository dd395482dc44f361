"""Reading activation values from a model: split numbers, full distributions, slot filling.

The fake LM below has digits as single tokens, like Qwen2.5 and SmolLM2; the tokenizer tests
load the real vocabularies (GGUF, vocab only) to show that the fake assumes what they do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from neuroscribe.simulate.llm import digit_distribution, simulation_from_value_probs
from neuroscribe.simulate.value_read import expected_value, read_slots, value_probs

NL, OTHER = 10, 11  # token ids: "0".."9" are 0..9, then "\n" and one other token
CODES = [[v] for v in range(10)] + [[1, 0]]  # "10" is "1" "0"


def dist(**p: float) -> np.ndarray:
    """Log-probabilities over the 12 tokens from {"d0": p, "nl": p, ...}; the rest to OTHER."""
    probs = np.zeros(12)
    for k, v in p.items():
        probs[NL if k == "nl" else int(k[1:])] = v
    probs[OTHER] += 1 - probs.sum()
    with np.errstate(divide="ignore"):
        return np.log(probs)


class FakeLM:
    """Next-token distributions chosen by the last token fed; records everything it is fed."""

    def __init__(self, after: dict[int, np.ndarray], default: np.ndarray) -> None:
        self.after, self.default = after, default
        self.ids: list[int] = []
        self.n_past = 0

    def evaluate(self, ids: Sequence[int]) -> np.ndarray:
        self.ids = self.ids[: self.n_past] + list(ids)
        self.n_past = len(self.ids)
        return self.after.get(self.ids[-1], self.default)

    def truncate(self, n: int) -> None:
        self.n_past = min(n, self.n_past)


def test_a_split_ten_is_read_exactly() -> None:
    # P("0")=.5, P("1")=.3, P("5")=.1; after "1": P("0")=.6, P("\n")=.4
    lm = FakeLM({1: dist(d0=0.6, nl=0.4)}, dist(d0=0.5, d1=0.3, d5=0.1))
    root = lm.evaluate([OTHER])
    probs = value_probs(lm, root, CODES)
    want = [0.5, 0.3 * 0.4] + [0.0] * 3 + [0.1] + [0.0] * 4 + [0.3 * 0.6]
    assert probs == pytest.approx(want)
    assert sum(probs) == pytest.approx(0.9)  # the value mass
    # EV = (1*.12 + 5*.1 + 10*.18) / .9 = 2.42 / .9
    assert expected_value(probs) == pytest.approx(2.42 / 0.9)
    # The old reading took the top-k digit "1" as the value 1: (1*.3 + 5*.1) / .9 = 0.889
    top = {"0": math.log(0.5), "1": math.log(0.3), "5": math.log(0.1)}
    assert digit_distribution(top)[2] == pytest.approx(0.8 / 0.9)
    assert lm.n_past == 1  # the "1" evaluated to split it was cut back


def test_an_unlikely_prefix_is_not_evaluated() -> None:
    lm = FakeLM({}, dist(d0=0.99995, d1=0.00005))
    probs = value_probs(lm, lm.evaluate([OTHER]), CODES)
    assert probs[1] == pytest.approx(0.00005) and probs[10] == 0.0
    assert lm.ids == [OTHER]  # nothing else was fed


def test_slots_are_filled_with_the_expected_value_before_the_next_is_read() -> None:
    # after token 7 the model predicts 3 for sure; after anything else 0
    lm = FakeLM({7: dist(d3=1.0)}, dist(d0=1.0))
    segs = [[OTHER, 7], [NL, 7], [NL, OTHER]]
    probs = read_slots(lm, segs, CODES, fill=None)
    assert [expected_value(p) for p in probs] == [3.0, 3.0, 0.0]
    assert lm.ids == [OTHER, 7, 3, NL, 7, 3, NL, OTHER]
    lm2 = FakeLM({7: dist(d3=1.0)}, dist(d0=1.0))
    read_slots(lm2, segs, CODES, fill=[OTHER])  # a fixed filler ("unknown")
    assert lm2.ids == [OTHER, 7, OTHER, NL, 7, OTHER, NL, OTHER]


def test_a_simulation_keeps_the_normalised_distribution() -> None:
    sim = simulation_from_value_probs(["a", "b"], [[0.25, 0.25] + [0.0] * 9, [0.0] * 11])
    assert sim.expected_activations == [0.5, 0.0]
    assert sim.distribution_probabilities[0][:2] == [0.5, 0.5]
    assert sim.distribution_probabilities[1] == []


@pytest.fixture(scope="module")
def smollm2_vocab():
    llama_cpp = pytest.importorskip("llama_cpp")
    from neuroscribe.models import default_model_path

    return llama_cpp.Llama(model_path=str(default_model_path()), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def qwen_vocab():
    llama_cpp = pytest.importorskip("llama_cpp")
    from neuroscribe.llm.backends import qwen_gguf_path

    return llama_cpp.Llama(model_path=str(qwen_gguf_path()), vocab_only=True, verbose=False)


@pytest.mark.parametrize("vocab", ["smollm2_vocab", "qwen_vocab"])
def test_real_tokenizers_split_ten_into_digits(vocab: str, request: pytest.FixtureRequest) -> None:
    llm = request.getfixturevalue(vocab)

    def pieces(text: str) -> list[str]:
        return [llm.detokenize([t]).decode() for t in
                llm.tokenize(text.encode(), add_bos=False, special=True)]

    assert pieces("cat\t10\n") == ["cat", "\t", "1", "0", "\n"]
    codes = [llm.tokenize(str(v).encode(), add_bos=False, special=True) for v in range(11)]
    assert all(len(c) == 1 for c in codes[:10]) and codes[10] == codes[1] + codes[0]
    assert len({c[0] for c in codes[:10]}) == 10


# --- the openai simulator on a backend that reads values ---------------------------------------


class ValueBackend:
    """Reads each slot as 'a split 10 with P(10)=.5, else 0' on lines whose token has 'cat'."""

    name, model, reads_values = "fake", "fake-1", True

    def __init__(self) -> None:
        self.requests: list = []

    async def complete(self, req):  # noqa: ANN001, ANN201 - the Backend protocol
        from neuroscribe.llm.client import Response

        self.requests.append(req)
        probs = [[0.4] + [0.0] * 9 + [0.5] if "cat" in seg.split("\n")[-1] else
                 [0.8] + [0.0] * 10 for seg in req.segments]
        return Response(text="", value_probs=probs)


def test_the_openai_simulator_reads_values_and_records_the_mass(tmp_path) -> None:  # noqa: ANN001
    import asyncio

    import neuroscribe.prompts as prompts
    from neuroscribe.llm.client import Client, LLMConfig, ResponseCache
    from neuroscribe.pipeline import ScoreConfig
    from neuroscribe.simulate.llm import OpenAISimulator

    backend = ValueBackend()
    c = Client(backend, LLMConfig(retries=0), ResponseCache(tmp_path / "c.sqlite"))
    sim = OpenAISimulator(ScoreConfig(simulator="openai", sim_batch_tokens=100,
                                      sim_fill="self"), c)
    seqs = [["a", " cat"], [" dog", " cats"]]
    out = asyncio.run(sim.simulate_many("cats", seqs))
    assert [s.expected_activations for s in out] == [[0.0, pytest.approx(50 / 9)],
                                                      [0.0, pytest.approx(50 / 9)]]
    req = backend.requests[0]
    assert req.fill == "self" and req.values == tuple(str(v) for v in range(11))
    assert len(req.segments) == 4 and req.segments[1] == "\n cat\t"
    assert req.segments[2] == "\n<end>\n<start>\n dog\t"
    # segment 0 is the prompt up to the first slot, without OpenAI's hidden few-shot tokens
    full = prompts.openai_simulate_prompt_many("cats", seqs, marker="\0", reveal=False)
    assert full.startswith(req.segments[0]) and req.segments[0].endswith("<start>\na\t")
    assert sim.report()["value_mass_mean"] == pytest.approx((0.8 + 0.9) / 2)
    default = OpenAISimulator(ScoreConfig(simulator="openai"), c)  # the default fill: self
    asyncio.run(default.simulate("cats", ["a"]))
    assert backend.requests[-1].fill == "self"
    zero = OpenAISimulator(ScoreConfig(simulator="openai", sim_fill="zero"), c)
    asyncio.run(zero.simulate("cats", ["a"]))
    assert backend.requests[-1].fill == "0"


def test_openai_few_shot_hides_tokens_before_the_first_revealed_one_only_for_unknown() -> None:
    import neuroscribe.prompts as prompts

    shots = prompts.few_shot_neurons()
    first = shots[0].records[0].tokens
    k = shots[0].first_revealed[0]
    hidden = prompts.openai_simulate_prompt_many("x", [["a"]], reveal=True)
    shown = prompts.openai_simulate_prompt_many("x", [["a"]], reveal=False)
    assert "\n".join(f"{t}\tunknown" for t in first[:k]) in hidden
    assert f"{first[0]}\tunknown" not in shown and f"{first[0]}\t0" in shown


def test_an_unknown_fill_is_a_clear_error() -> None:
    from neuroscribe.errors import UserError
    from neuroscribe.llm.client import Client, LLMConfig
    from neuroscribe.pipeline import ScoreConfig
    from neuroscribe.simulate.llm import OpenAISimulator

    with pytest.raises(UserError, match="unknown --sim-fill 'ones'"):
        OpenAISimulator(ScoreConfig(sim_fill="ones"), Client(ValueBackend(), LLMConfig()))


@pytest.mark.integration
def test_smollm2_reads_values_through_the_kv_cache() -> None:
    """The real llama.cpp backend: every slot gets a distribution, the KV cache is reused for
    a prompt that shares the few-shot part, and the split 10 costs no stray position."""
    pytest.importorskip("llama_cpp")
    from neuroscribe.llm.backends import LlamaCppBackend
    from neuroscribe.llm.client import LLMConfig, Request
    from neuroscribe.prompts import openai_simulate_segments

    b = LlamaCppBackend(LLMConfig(llm_model="smollm2", n_ctx=2048))
    values = tuple(str(v) for v in range(11))
    segs = openai_simulate_segments("the word cat", [[" the", " cat", " sat"]])
    r1 = b._run(Request(segments=tuple(segs), values=values, fill="self"))
    assert len(r1.value_probs) == 3 and all(0 < sum(p) <= 1 + 1e-6 for p in r1.value_probs)
    fill = [str(round(sum(v * q for v, q in enumerate(p)) / sum(p))) for p in r1.value_probs]
    text = "".join(s + f for s, f in zip(segs, fill))[: -len(fill[-1])]  # no fill after the last
    ids = b.llm.tokenize(text.encode(), add_bos=False, special=True)
    assert b.llm.input_ids[: b.llm.n_tokens].tolist() == ids  # the prompt and its fills, no more
    segs2 = openai_simulate_segments("the word cat", [[" a", " cat"]])
    r2 = b._run(Request(segments=tuple(segs2), values=values, fill="self"))
    assert r2.prompt_tokens < 40  # the shared few-shot part was not evaluated again


@pytest.mark.integration
def test_check_simulator_reads_smollm2_above_chance_with_the_mass_on_values(tmp_path) -> None:  # noqa: ANN001
    """The standing check on a small set (a puzzle and a planted concept) with SmolLM2. With
    top-15 prompt logprobs and "unknown" slots (the old reading) the values got 0.26 of the
    probability here; reading the full distribution with "0" fills gives 0.93 and AUROC
    0.67 (2026-12-05)."""
    pytest.importorskip("llama_cpp")
    from conftest import make_text

    from neuroscribe.groundtruth.check_simulator import (
        CheckConfig,
        check,
        planted_cases,
        puzzle_cases,
    )
    from neuroscribe.simulate.core import make_simulator

    cases = puzzle_cases("packaged", 1)
    cases += planted_cases("packaged", make_text(60), n=1, per=2, length=16)[0]
    assert [c.source for c in cases].count("planted") == 2
    cfg = CheckConfig(simulator="openai", llm_model="smollm2", cache_dir=str(tmp_path),
                      n_ctx=2048, sim_fill="zero")  # SmolLM2 reads noise with its own fills
    report = check(cfg, make_simulator(cfg), cases)
    assert report["simulator_stats"]["value_mass_mean"] > 0.8
    assert report["all"]["auroc"] > 0.6


def test_the_hf_backend_reads_values_and_cuts_its_cache_back(tiny_model) -> None:  # noqa: ANN001
    """transformers' DynamicCache: the same distributions as a fresh forward pass of the
    whole text, and a second request reuses the shared prefix."""
    import torch

    from neuroscribe.llm.client import LLMConfig, Request
    from neuroscribe.llm.hf import HFBackend
    from neuroscribe.simulate.value_read import log_softmax

    b = HFBackend(LLMConfig(provider="hf", llm_model=str(tiny_model)))
    segs = ("the cat\t", "\n sat\t")
    r = b._run(Request(segments=segs, values=("0", "1", "2"), fill="0"))
    tok, model = b.subject.tokenizer, b.subject.model
    ids = tok(segs[0], add_special_tokens=False).input_ids
    with torch.inference_mode():
        want = log_softmax(model(torch.tensor([ids])).logits[0, -1].numpy())
    codes = [tok(v, add_special_tokens=False).input_ids for v in ("0", "1", "2")]
    assert all(len(c) == 1 for c in codes)  # single tokens here: no trie walk needed
    assert r.value_probs[0] == pytest.approx([math.exp(want[c[0]]) for c in codes], rel=1e-4)
    assert b.lm.ids == ids + codes[0] + tok(segs[1], add_special_tokens=False).input_ids
    r2 = b._run(Request(segments=(segs[0], "\n on\t"), values=("0", "1", "2"), fill="0"))
    assert r2.value_probs[0] == pytest.approx(r.value_probs[0], rel=1e-4)
    assert r2.prompt_tokens < len(b.lm.ids)  # the shared prefix was not evaluated again


def test_segments_of_a_token_holding_nul_keep_every_slot() -> None:
    """OpenAI's "int" puzzle has a C-string token "\\x00", the slot marker's first choice: the
    segments must still be one per token, and put back together they give the prompt with
    that token in it (this raised a ValueError before, and killed a 20-minute check)."""
    from neuroscribe.prompts import openai_simulate_prompt_many, openai_simulate_segments

    toks = [["char", " s", "[", "\x00", "]"]]
    segs = openai_simulate_segments("integer variables", toks)
    assert len(segs) == 5 and any("\x00" in s for s in segs)
    whole = openai_simulate_prompt_many("integer variables", toks, marker="@@", reveal=False)
    joined = "".join(s + "@@" for s in segs)  # the text after the last slot is not a segment
    assert whole.startswith(joined) and "@@" not in whole[len(joined):]
