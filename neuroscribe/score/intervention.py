"""A causal score: what a unit does to the output, judged against its explanation.

After Paulo et al. ("Automatically Interpreting Millions of Features", 2024, intervention
scoring): the subject model is steered by adding the unit's output direction to the residual
stream where the unit writes to it (an MLP neuron's ``down_proj`` column / ``c_proj`` row at
the MLP's output; an SAE latent's ``W_dec`` row mapped the same way; a residual unit's basis
vector at its own module), scaled to several multiples of the unit's typical top activation
(the median peak of its training top records). Greedy continuations of a few neutral prompts
are generated, batched, with the KV cache, unsteered (once: the same for every unit) and at
each scale.

The judge ranks every continuation by how well it matches the explanation, blind to whether
it was steered: the cosine of sentence embeddings (MiniLM) to the explanation, less the mean
cosine to a fixed set of distractor explanations (so a continuation that is only different
is not a match). Undecodable byte fragments (U+FFFD) are dropped first; a continuation left
with no text matches nothing and gets the lowest score. The score is the AUROC of steered
against unsteered continuations (0.5: the explanation says nothing about the unit's effect).
Beside it, the KL divergence of the next-token distribution at the end of each prompt
(unsteered to steered), so a unit that changes nothing is visible as KL ~ 0.

The prompts are data (``data/intervention_prompts.json``); prompts, scales, the peak and the
generation length are written with every unit's result.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.runs import opt

PROMPTS = Path(__file__).parents[1] / "data" / "intervention_prompts.json"


@dataclass
class InterventionConfig:
    """The intervention scorer (``--scorers intervention``): steering and generation."""

    intervention_scales: str = opt("1,3,10", "multiples of the unit's typical top activation "
                                   "added along its output direction, comma-separated")
    intervention_tokens: int = opt(12, "tokens generated per continuation (greedy, KV cache)")
    intervention_prompts: str = opt("", "JSON list of neutral prompts ('' for neuroscribe's)")
    intervention_judge: str = opt("embedding", "who ranks the continuations, blind: embedding "
                                  "(MiniLM, no LLM) or llm (the --provider model, as "
                                  "detection)", choices=("embedding", "llm"))


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise UserError(f"--intervention-scales {text!r}: give numbers, e.g. 1,3,10") from e
    if not scales or any(s <= 0 or not math.isfinite(s) for s in scales):
        raise UserError(f"--intervention-scales {text!r}: give positive multiples, e.g. 1,3,10")
    return scales


def load_prompts(path: str = "") -> tuple[list[str], list[str]]:
    """The prompts and the judge's distractor explanations (neuroscribe's when a file gives
    only a list of prompts)."""
    file = Path(path).expanduser() if path else PROMPTS
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--intervention-prompts {file}: {e}") from e
    prompts = data.get("prompts") if isinstance(data, dict) else data
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise UserError(f"{file}: expected a JSON list of prompts, or {{\"prompts\": [...], "
                        "\"distractors\": [...]}")
    distractors = data.get("distractors") if isinstance(data, dict) else None
    if not distractors:
        distractors = json.loads(PROMPTS.read_text())["distractors"]
    return list(prompts), list(distractors)


def steering_site(model: Any, hookpoint: str) -> Any:
    """The module whose output the unit's direction is added to: the MLP (the activation's
    parent) for MLP activations, else the hookpoint's own module."""
    from neuroscribe.models import parse_hookpoint

    path = parse_hookpoint(hookpoint).path
    modules = dict(model.named_modules())
    if path.endswith((".act", ".act_fn")) and "." in path:
        return modules[path.rsplit(".", 1)[0]]
    return modules[path]


@contextmanager
def steer(module: Any, direction: Any, alphas: Any) -> Any:
    """Add ``alphas[b] * direction`` to ``module``'s output at every position of row b."""
    def hook(_mod: Any, _args: Any, output: Any) -> Any:
        x = output[0] if isinstance(output, tuple) else output
        x = x + alphas.to(x)[:, None, None] * direction.to(x)
        return (x, *output[1:]) if isinstance(output, tuple) else x

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def generate(model: Any, tokenizer: Any, prompts: list[str], n_tokens: int,
             site: Any = None, direction: Any = None, alphas: Any = None) -> tuple[Any, Any]:
    """Greedy continuations of ``prompts`` (left-padded, one batch, KV cache), steered when
    ``site`` is given: the new token ids ``[B, n_tokens]`` and the log-probabilities of the
    next token after each prompt ``[B, vocab]``."""
    import torch

    enc = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
    ctx = steer(site, direction, alphas) if site is not None else _nothing()
    import inspect

    # transformers 5 renamed past_key_values to cache (the old name warns, then goes)
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # no logits unused
    out = []
    with torch.no_grad(), ctx:
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **last)
        first = torch.log_softmax(res.logits[:, -1].float(), -1)
        logits, past = res.logits[:, -1], _cache_of(res)
        for _ in range(n_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = mask.sum(1, keepdim=True) - 1
            res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                        use_cache=True, **{key: past}, **last)
            logits, past = res.logits[:, -1], _cache_of(res)
    return torch.stack(out, 1), first


def _cache_of(res: Any) -> Any:
    return getattr(res, "cache", None) or res.past_key_values


@contextmanager
def _nothing() -> Any:
    yield


def typical_peak(nr: Any) -> float:
    """The median peak activation of the unit's training top records."""
    import statistics

    peaks = [max(r.activations) for r in nr.top_split("train")] or [nr.max_activation]
    return float(statistics.median(peaks))


def kl(p_log: Any, q_log: Any) -> Any:
    """KL(p || q) per row, from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


class InterventionScorer:
    """``--scorers intervention``: steer, generate, judge blind (see the module docstring)."""

    needs_subject = True

    def __init__(self, cfg: Any, client: Any = None) -> None:
        self.cfg, self.scales = cfg, parse_scales(cfg.intervention_scales)
        self.prompts, self.distractors = load_prompts(cfg.intervention_prompts)
        self._subject: Any = None
        self.llm_judge: Any = None  # set by the score stage for --intervention-judge llm
        self._saes: dict[str, Any] = {}
        self._dirs: dict[str, Any] = {}
        self._base: Any = None  # the unsteered continuations: the same for every unit
        from neuroscribe.simulate.core import Embedder

        self.embed = Embedder(getattr(cfg, "embed_device", "cpu"))

    def attach(self, subject: Any, hookpoints: list[str]) -> None:
        """The subject model and its SAEs (the score stage passes the run's)."""
        from neuroscribe.models import load_saes

        self._subject = subject
        self._saes = load_saes(subject.model, [h for h in hookpoints if ":sae=" in h])

    def direction(self, hookpoint: str, unit: int) -> Any:
        from neuroscribe.record.output_tokens import unit_directions

        if hookpoint not in self._dirs:
            self._dirs[hookpoint] = unit_directions(self._subject.model, hookpoint,
                                                    self._saes.get(hookpoint))
        return self._dirs[hookpoint][unit]

    def steered(self, hookpoint: str, unit: int, peak: float) -> dict[str, Any]:
        """Continuations unsteered (generated once for all units) and at every scale, and
        the KL per scale."""
        import torch

        model, tok = self._subject.model, self._subject.tokenizer
        n, new = len(self.prompts), self.cfg.intervention_tokens
        if self._base is None:
            ids, first = generate(model, tok, self.prompts, new)
            self._base = (tok.batch_decode(ids.tolist()), first)
        base, base_first = self._base
        prompts = [p for _ in self.scales for p in self.prompts]
        alphas = torch.tensor([s * peak for s in self.scales for _ in self.prompts])
        ids, first = generate(model, tok, prompts, new, steering_site(model, hookpoint),
                              self.direction(hookpoint, unit), alphas)
        texts = tok.batch_decode(ids.tolist())
        return {"texts": [base, *(texts[i * n:(i + 1) * n] for i in range(len(self.scales)))],
                "kl": [float(kl(base_first, first[i * n:(i + 1) * n]).mean())
                       for i in range(len(self.scales))]}

    def judge(self, explanation: str, texts: list[str]) -> list[float]:
        """How much closer each text is to the explanation than to the distractors, on
        average (cosines of MiniLM embeddings); -2 (below any such value) for no text."""
        clean = [t.replace("\ufffd", "").strip() for t in texts]
        vecs = self.embed([c or "." for c in clean])
        sims = vecs @ self.embed([explanation])[0] - (vecs @ self.embed(self.distractors).T
                                                      ).mean(1)
        return [float(v) if c else -2.0 for v, c in zip(sims, clean)]

    async def score_unit(self, explanation: str, hookpoint: str, unit: int,
                         nr: Any) -> dict[str, Any]:
        from neuroscribe.score.core import auroc

        if self._subject is None:
            raise UserError("the intervention scorer needs the subject model (attach)")
        peak = typical_peak(nr)
        out = self.steered(hookpoint, unit, peak)
        base, steered = out["texts"][0], out["texts"][1:]
        texts = [*base, *(t for ts in steered for t in ts)]
        if self.cfg.intervention_judge == "llm":
            if self.llm_judge is None:
                raise UserError("--intervention-judge llm needs an LLM client (score stage)")
            sims = await self.llm_judge(explanation, texts)
        else:
            sims = self.judge(explanation, texts)
        n = len(base)
        by_scale = {f"{s:g}": auroc(sims[:n] + sims[(i + 1) * n:(i + 2) * n],
                                    [False] * n + [True] * n)
                    for i, s in enumerate(self.scales)}
        return {"auroc": auroc(sims, [False] * n + [True] * (len(sims) - n)),
                "auroc_by_scale": by_scale,
                "kl": {f"{s:g}": k for s, k in zip(self.scales, out["kl"])},
                "no_effect": max(out["kl"]) < 1e-6, "peak": peak,
                "judge": self.cfg.intervention_judge,
                "scales": self.scales, "prompts": self.prompts,
                "new_tokens": self.cfg.intervention_tokens,
                "examples": [{"prompt": p, "unsteered": b, "steered": s}
                             for p, b, s in zip(self.prompts[:3], base, steered[-1])]}
