"""Planted-neuron recovery: judge each planted unit's explanation against its concept's true
description and distractors (MiniLM embeddings, or an LLM), and the report table."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from neuroscribe.groundtruth.planted import Concept


def embedding_verdict(embed: Any, explanation: str, concept: Concept,
                      others: Sequence[Concept]) -> dict[str, Any]:
    """Recovered when the explanation is closer (cosine) to the truth than to every
    distractor; also the nearest true description among all planted concepts."""
    vecs = embed([explanation, concept.description, *concept.distractors])
    sims = [float(vecs[0] @ v) for v in vecs[1:]]
    alls = embed([c.description for c in others]) @ vecs[0]
    return {"recovered": all(sims[0] > s for s in sims[1:]), "similarity_true": round(sims[0], 4),
            "similarity_distractors": [round(s, 4) for s in sims[1:]],
            "nearest_concept": others[int(alls.argmax())].name}


async def llm_verdict(client: Any, explanation: str, concept: Concept,
                      seed: int = 0) -> dict[str, Any]:
    """The LLM picks the description that matches; the options are shuffled per concept."""
    from neuroscribe.llm.client import LLMError, Request

    t = json.loads(resources.files("neuroscribe").joinpath("data/planted/judge.json").read_text())
    options = [concept.description, *concept.distractors]
    random.Random(f"{seed}:{concept.name}").shuffle(options)
    listed = "\n".join(t["option"].format(index=i + 1, text=o) for i, o in enumerate(options))
    user = t["user"].format(explanation=explanation, options=listed)
    try:
        reply = await client.complete(Request(messages=(("system", t["system"]), ("user", user)),
                                              max_tokens=8, stage="judge"))
    except LLMError as e:
        return {"recovered": False, "failure": str(e)}
    m = re.search(r"\d+", reply.text)
    if m is None or not 1 <= int(m.group()) <= len(options):
        return {"recovered": False, "failure": f"no option number in reply {reply.text!r}"}
    choice = options[int(m.group()) - 1]
    return {"recovered": choice == concept.description, "choice": choice}


class EmbeddingJudge:
    """``embedding_verdict`` with one MiniLM embedder for the whole run."""

    def __init__(self, concepts: Sequence[Concept], _ec: Any) -> None:
        from neuroscribe.simulate.core import Embedder

        self.concepts, self.embed = list(concepts), Embedder()

    def __call__(self, explanation: str, concept: Concept) -> dict[str, Any]:
        return embedding_verdict(self.embed, explanation, concept, self.concepts)


class LLMJudge:
    """``llm_verdict`` with the LLM configured for the explainer (its usage is reported)."""

    def __init__(self, _concepts: Sequence[Concept], ec: Any) -> None:
        from neuroscribe.llm.client import LLMConfig, make_client

        self.client = make_client(LLMConfig(**{f.name: getattr(ec, f.name)
                                               for f in dataclasses.fields(LLMConfig)}))

    def __call__(self, explanation: str, concept: Concept) -> dict[str, Any]:
        return asyncio.run(llm_verdict(self.client, explanation, concept))


Judge = Callable[[str, Concept], dict[str, Any]]
JUDGES: dict[str, Callable[[Sequence[Concept], Any], Judge]] = {"embedding": EmbeddingJudge,
                                                                "llm": LLMJudge}


def _unit_facts(store: Any, hp: str, unit: int, strength: float) -> dict[str, Any]:
    """What the run holds for one planted unit: firing rate, explanation, its valid score."""
    from neuroscribe.explain.core import explanation_path
    from neuroscribe.pipeline import score_path

    run_dir, t = store.run_dir, store.unit_tensors(hp, unit)
    top = t["top_acts"][t["top_ctx"] >= 0]
    facts: dict[str, Any] = {"unit": unit, "firing_rate": round(float(t["mean"]) / strength, 6),
                             "active_top_records": int((top.amax(-1) > 0).sum())}
    expl = json.loads(explanation_path(run_dir, hp, unit).read_text())
    facts["explanation"] = expl.get("explanation")
    facts["explain_failure"] = expl.get("failure")
    path = score_path(run_dir, hp, unit, "scores")
    detail = json.loads(path.read_text()) if path.exists() else {}
    facts["valid_all_score"] = detail.get("scores", {}).get("valid_all", {}).get(
        "ev_correlation_score")
    return facts


def judge_run(run_dir: Path, planting: dict[str, Any], concepts: Sequence[Concept],
              judges: dict[str, Judge]) -> dict[str, Any]:
    """Every planted unit's facts and verdicts, and the recovery fraction per judge."""
    from neuroscribe.record.core import RecordStore

    store, by_name, units = RecordStore(run_dir), {c.name: c for c in concepts}, []
    for unit, name in planting["units"].items():
        facts = {"concept": name, **_unit_facts(store, planting["hookpoint"], int(unit),
                                                planting["strength"])}
        facts["verdicts"] = {
            j: judge(facts["explanation"], by_name[name]) if facts["explanation"] else
            {"recovered": False, "failure": f"no explanation: {facts['explain_failure']}"}
            for j, judge in judges.items()}
        units.append(facts)
    hits = {j: sum(u["verdicts"][j]["recovered"] for u in units) for j in judges}
    recovery = {j: {"recovered": h, "n": len(units), "fraction": round(h / max(len(units), 1), 4)}
                for j, h in hits.items()}
    if "embedding" in judges:  # stricter: the nearest of all K true descriptions is the own one
        recovery["embedding"]["nearest_of_all"] = sum(
            u["verdicts"]["embedding"].get("nearest_concept") == u["concept"] for u in units)
    return {"units": units, "recovery": recovery}


def format_table(report: dict[str, Any]) -> str:
    p = report["planting"]
    lines = [f"planted neurons: {len(p['units'])} at {p['hookpoint']} of {p['model']}, "
             f"explainer {report['explainer']}, simulator {report['simulator']}",
             f"  {'unit':>5} {'concept':<21}{'fires':>7}{'score':>7}  "
             + "".join(f"{j[:5]:<6}" for j in report["recovery"]) + "explanation"]
    for u in report["units"]:
        s = u["valid_all_score"]
        marks = "".join(f"{'yes' if v['recovered'] else 'no':<6}" for v in u["verdicts"].values())
        lines.append(f"  {u['unit']:>5} {u['concept'][:20]:<21}{u['firing_rate']:>7.3f}"
                     f"{'   nan' if s is None else f'{s:6.3f}':>7}  {marks}"
                     f"{u['explanation'] or 'FAILED: ' + str(u['explain_failure'])}")
    for j, r in report["recovery"].items():
        lines.append(f"concept recovery ({j} judge): {r['recovered']} / {r['n']} = "
                     f"{100 * r['fraction']:.1f}%" + (f"; nearest of all {r['n']} true "
                     f"descriptions: {r['nearest_of_all']} / {r['n']}"
                     if "nearest_of_all" in r else ""))
    lines.append("stage seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    return "\n".join(lines)
