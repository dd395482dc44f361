"""LLM cost and throughput of explain + score: bench/results/llm-tokens.json and
bench/results/llm-throughput.json.

1. Tokens per scored unit for every explainer x scorer combination, on real neurons of
   SmolLM2-135M (layer 3 MLP; the run is recorded first when --run does not exist): the
   explanation is written from the unit's 5 top train records and scored on its 5 top + 5
   random valid records, uncalibrated, as in OpenAI's demo. Counts are the backend's own usage
   (prompt + completion tokens), with the response cache off.
2. OpenAI's published method on the same records and the same LLM: their prompts, built by
   their own code (``--openai-src``: the ``neuron-explainer`` folder of
   openai/automated-interpretability), are sent through the same backend: one chat prompt
   (TokenActivationPairExplainer, HARMONY_V4) and one all-at-once simulation prompt per record
   (ExplanationNeuronSimulator, INSTRUCTION_FOLLOWING, echo with max_tokens 1), as in their
   ``generate_and_score_explanation`` demo. Their prompt builder's tiktoken length check is
   replaced by a no-op (tiktoken cannot download its tables offline), and their blob-storage
   imports are stubbed when those packages are absent.
3. Units per minute of a whole explain (highlight) + score (detection) of --throughput-units
   units against a local ``llama_cpp.server`` at concurrency 1, 2, 4 and 8, a fresh cache each
   time.

    python bench/llm.py --openai-src /path/to/automated-interpretability/neuron-explainer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from neuroscribe.explain.core import EXPLAINERS, ExplainConfig, ExplanationError, explain
from neuroscribe.llm.backends import LlamaCppBackend
from neuroscribe.llm.client import Client, LLMConfig, Request
from neuroscribe.pipeline import ScoreConfig, score
from neuroscribe.record.core import RecordConfig, RecordStore, record
from neuroscribe.score.classify import SCORERS as CLASSIFIERS
from neuroscribe.score.classify import ClassifyError, HeldOut
from neuroscribe.simulate.core import SIMULATORS, SimulationError, simulate_records

HOOKPOINT = "model.layers.3.mlp.act_fn"
EXPLAINER_NAMES = ("openai", "highlight", "contrastive")
# scorer name -> (registry, extra config): the openai simulator per record (OpenAI) and with
# all ten records in one prompt, the json simulator, the program simulator (one code-writing
# call per explanation), and the two scorers without logprobs.
SCORER_SETUPS: dict[str, tuple[str, dict[str, Any]]] = {
    "openai-sim-per-record": ("openai", {"sim_batch_tokens": 0}),
    "openai-sim-one-prompt": ("openai", {"sim_batch_tokens": 1024}),
    "json-sim": ("json", {}),
    "program-sim": ("program", {}),
    "detection": ("detection", {}),
    "fuzzing": ("fuzzing", {}),
}


def tokens_of(client: Client) -> int:
    return sum(u.prompt_tokens + u.completion_tokens for u in client.usage.values())


def ensure_run(run_dir: Path, max_tokens: int) -> RecordStore:
    if not (run_dir / "record.json").exists():
        record(RecordConfig(hookpoints=HOOKPOINT, max_tokens=max_tokens), run_dir)
    return RecordStore(run_dir)


async def ours(backend: Any, llm: dict[str, Any], nr: Any) -> dict[str, dict[str, Any]]:
    """Tokens spent per explainer (explain) and per scorer (score) on one unit."""
    train = nr.top_split("train", 5)
    held = nr.top_split("valid", 5) + nr.random_split("valid", 5)
    held_out = HeldOut(tuple(nr.top_split("valid", 5)), tuple(nr.random_split("valid", 5)))
    out: dict[str, dict[str, Any]] = {"explain": {}, "score": {}, "explanations": {}}
    explanation = ""
    for name in EXPLAINER_NAMES:
        ec = ExplainConfig(explainer=name, n_per_split=5, **llm)
        client = Client(backend, ec, None)
        try:  # a rejected explanation spent its tokens all the same
            text = (await EXPLAINERS[name](ec, client).explain(
                train, nr.random_split("calibration")))[0]
        except ExplanationError as e:
            text = f"failed: {e}"
        out["explain"][name] = tokens_of(client)
        out["explanations"][name] = text
        explanation = explanation or ("" if text.startswith("failed: ") else text)
    explanation = explanation or "words"
    for label, (name, extra) in SCORER_SETUPS.items():
        sc = ScoreConfig(simulator=name, calibrate=False, **extra, **llm)
        client = Client(backend, sc, None)
        try:  # a reply that cannot be used spent its tokens all the same
            if name in CLASSIFIERS:
                await CLASSIFIERS[name](sc, client).score(explanation, held_out)
            else:
                await simulate_records(SIMULATORS[name](sc, client), explanation, held)
        except (SimulationError, ClassifyError) as e:
            out.setdefault("score_failures", {})[label] = str(e)
        out["score"][label] = tokens_of(client)
    return out


async def openai_method(backend: Any, llm: dict[str, Any], nr: Any, src: Path) -> dict[str, int]:
    """OpenAI's demo pipeline's prompts, built by their code, through the same backend."""
    import importlib.util
    import types

    sys.path.insert(0, str(src))
    for name in ("blobfile", "boostedblob", "tiktoken"):  # storage and tokenizer, unused here
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            stub.ensure_session = lambda f: f  # type: ignore[attr-defined]  # a decorator
            sys.modules[name] = stub
    os.environ.setdefault("OPENAI_API_KEY", "unused")  # their client asserts one at import
    from neuron_explainer.activations.activation_records import calculate_max_activation
    from neuron_explainer.activations.activations import ActivationRecord as OAIRecord
    from neuron_explainer.explanations import prompt_builder
    from neuron_explainer.explanations.explainer import TokenActivationPairExplainer
    from neuron_explainer.explanations.prompt_builder import PromptFormat
    from neuron_explainer.explanations.simulator import ExplanationNeuronSimulator

    prompt_builder.PromptBuilder.prompt_length_in_tokens = lambda self, fmt: 0  # no tiktoken

    def conv(records: list[Any]) -> list[Any]:
        return [OAIRecord(tokens=r.tokens, activations=r.activations) for r in records]

    train = conv(nr.top_split("train", 5))
    held = conv(nr.top_split("valid", 5) + nr.random_split("valid", 5))
    explainer = TokenActivationPairExplainer(model_name="gpt-4",  # a name their check accepts
                                             prompt_format=PromptFormat.HARMONY_V4)
    messages = explainer.make_explanation_prompt(
        all_activation_records=train, max_activation=calculate_max_activation(train),
        max_tokens_for_completion=60)
    client = Client(backend, LLMConfig(**llm), None)
    resp = await client.complete(Request(
        messages=tuple((str(getattr(m["role"], "value", m["role"])), m["content"])
                               for m in messages), max_tokens=60))
    explain_tokens = tokens_of(client)
    simulator = ExplanationNeuronSimulator(
        "local", resp.text.strip() or "words", prompt_format=PromptFormat.INSTRUCTION_FOLLOWING)
    for r in held:
        await client.complete(Request(prompt=simulator.make_simulation_prompt(r.tokens),
                                      max_tokens=1, prompt_logprobs=15))
    return {"explain": explain_tokens, "score": tokens_of(client) - explain_tokens}


def token_table(run_dir: Path, units: list[int], llm: dict[str, Any],
                src: Path | None) -> dict[str, Any]:
    store = RecordStore(run_dir)
    backend = LlamaCppBackend(LLMConfig(**llm))
    per_unit, reference = [], []
    for u in units:
        nr = store.neuron_record(HOOKPOINT, u)
        per_unit.append(asyncio.run(ours(backend, llm, nr)))
        if src is not None:
            reference.append(asyncio.run(openai_method(backend, llm, nr, src)))
    combos = {f"{e}+{s}": statistics.median(p["explain"][e] + p["score"][s] for p in per_unit)
              for e in EXPLAINER_NAMES for s in SCORER_SETUPS}
    out: dict[str, Any] = {"units": units, "tokens_per_unit_median": combos,
                           "per_unit": per_unit}
    if reference:
        oai = statistics.median(r["explain"] + r["score"] for r in reference)
        out["openai_method"] = {"tokens_per_unit_median": oai, "per_unit": reference}
        out["ratio_to_openai"] = {k: round(v / oai, 3) for k, v in combos.items()}
    return out


def throughput(run_dir: Path, n_units: int, model: str, levels: list[int]) -> dict[str, Any]:
    """Units per minute of explain + score through a local llama_cpp.server."""
    from neuroscribe.llm.local_server import local_servers

    out: dict[str, Any] = {}
    with local_servers(model, 1, threads=os.cpu_count() or 1, n_ctx=4096,
                       logits_all=True) as started:
        base = started[0][1]
        for c in levels:
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp) / "run"
                work.mkdir()
                for name in ("record.json", "vocab.json", "records"):
                    (work / name).symlink_to((run_dir / name).resolve())
                llm = dict(provider="openai", llm_model="local", base_url=base,
                           api_key_env="NEUROSCRIBE_BENCH_NO_KEY", concurrency=c,
                           cache_dir=str(Path(tmp) / "cache"))
                t0 = time.perf_counter()
                explain(ExplainConfig(explainer="highlight", units=f"first:{n_units}",
                                      n_per_split=5, **llm), work)
                score(ScoreConfig(simulator="embedding", scorers="detection", n_per_split=5,
                                  calibrate=False, **llm), work)
                dt = time.perf_counter() - t0
            out[str(c)] = {"seconds": round(dt, 1), "units_per_minute": round(60 * n_units / dt, 2)}
            print(f"concurrency {c}: {out[str(c)]}", flush=True)
    return out


def main() -> None:
    from neuroscribe.models import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/bench-llm", help="recorded run (made if missing)")
    ap.add_argument("--max-tokens", type=int, default=50000, help="tokens to record")
    ap.add_argument("--units", type=int, default=3, help="units for the token table (0: skip)")
    ap.add_argument("--throughput-units", type=int, default=6)
    ap.add_argument("--concurrency", default="1,2,4,8", help="levels ('': skip)")
    ap.add_argument("--llm-model", default="smollm2", help="llamacpp model of the token table")
    ap.add_argument("--openai-src", default="", help="openai neuron-explainer folder")
    ap.add_argument("--out-dir", default="bench/results", help="llm-tokens.json and "
                    "llm-throughput.json go here")
    args = ap.parse_args()
    run_dir = Path(args.run)
    ensure_run(run_dir, args.max_tokens)
    llm = dict(provider="llamacpp", llm_model=args.llm_model, n_ctx=8192)
    head = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "hookpoint": HOOKPOINT}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.units:
        tokens = token_table(run_dir, list(range(args.units)), llm,
                             Path(args.openai_src) if args.openai_src else None)
        print(json.dumps({k: v for k, v in tokens.items() if k != "per_unit"}, indent=1))
        (out / "llm-tokens.json").write_text(json.dumps({
            **head, "llm": args.llm_model,
            "records": "explain: 5 top train records; score: 5 top + 5 random valid records",
            "tokens": tokens}, indent=1) + "\n")
    levels = [int(c) for c in args.concurrency.split(",") if c]
    if levels:
        result = {**head, "model": "SmolLM2-135M-Instruct GGUF through llama_cpp.server",
                  "units": args.throughput_units, "explainer": "highlight",
                  "scorer": "detection (5 examples per prompt), with the embedding simulator "
                  "(no LLM): llama_cpp.server's echo logprobs, which the openai simulator "
                  "needs, cost tens of seconds per long prompt on this CPU",
                  "by_concurrency": throughput(run_dir, args.throughput_units,
                                               default_model_path(), levels)}
        (out / "llm-throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}/llm-*.json")


if __name__ == "__main__":
    main()
