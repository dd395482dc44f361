"""``neuroscribe read``: which explained units fire on each token of a text, in words.

The subject model runs on the text through the run's hookpoints (SAE latents included). A
unit counts as firing at a token when its activation passes its threshold: the boundary of
the run's recorded quantile ``--quantile`` (per-context maxima, so 0.99 keeps only strong
firing). Units are ranked at each token by activation over threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.runs import opt


@dataclass
class ReadConfig:
    """How many units to show and how strongly they must fire."""

    top: int = opt(3, "units shown per token")
    quantile: float = opt(0.99, "threshold of each unit: its recorded quantile boundary "
                          "(one of 0.5, 0.9, 0.99, 0.999)")
    summary_top: int = opt(10, "units in the summary of the whole text")
    all_units: bool = opt(False, "also show units that have no explanation")
    window: int = opt(1024, "tokens per forward pass (longer texts are read in windows)")


@dataclass
class UnitInfo:
    """What a run knows of its units at one hookpoint: thresholds, which units have an
    explanation file (names only: a file is opened when its unit first fires), and a cache."""

    folder: Path  # explanations/<safe hookpoint>
    scores_folder: Path
    thresholds: Any  # [units] float tensor
    explained: set[int]
    _words: dict[int, tuple[str | None, float | None]]

    def words(self, unit: int) -> tuple[str | None, float | None]:
        """(explanation, score) of a unit; (None, None) when it has neither."""
        if unit not in self._words:
            expl = None
            if unit in self.explained:
                expl = json.loads((self.folder / f"{unit}.json").read_text()).get("explanation")
            score = _score(self.scores_folder / f"{unit}.scores.json") if expl else None
            self._words[unit] = (None if expl is None else str(expl), score)
        return self._words[unit]


def _score(path: Path) -> float | None:
    if not path.exists():
        return None
    s = json.loads(path.read_text()).get("scores") or {}
    v = (s.get("test_all") or s.get("valid_all") or {}).get("ev_correlation_score")
    return None if v is None else float(v)


def load_unit_info(run_dir: Path, hookpoint: str, quantile: float) -> UnitInfo:
    import os

    from safetensors import safe_open

    from neuroscribe.models import safe_name
    from neuroscribe.record.core import store_path
    from neuroscribe.stats import QUANTILES

    if quantile not in QUANTILES[1:]:
        raise UserError(f"--quantile must be one of {list(QUANTILES[1:])}, not {quantile}")
    with safe_open(str(store_path(run_dir, hookpoint)), framework="pt") as f:
        bounds = f.get_tensor("quantile_boundaries")
    thr = bounds[:, QUANTILES.index(quantile)].float().clamp_min(1e-6)
    folder = run_dir / "explanations" / safe_name(hookpoint)
    names = os.listdir(folder) if folder.is_dir() else []
    explained = {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}
    return UnitInfo(folder, run_dir / "scores" / safe_name(hookpoint), thr, explained, {})


def _firing(acts: Any, info: UnitInfo, all_units: bool) -> tuple[Any, Any, Any]:
    """(token positions, units, activations) of firing units; ``acts`` is [T, units]."""
    import torch

    if acts.is_sparse:
        acts = acts.coalesce()
        (pos, unit), val = acts.indices(), acts.values().float()
    else:
        pos, unit = torch.nonzero(acts >= info.thresholds.to(acts.device), as_tuple=True)
        val = acts[pos, unit].float()
    keep = val >= info.thresholds.to(val.device)[unit]
    if not all_units:
        explained = torch.zeros(len(info.thresholds), dtype=torch.bool, device=val.device)
        explained[sorted(info.explained)] = True
        keep &= explained[unit]
    return pos[keep].cpu(), unit[keep].cpu(), val[keep].cpu()


def read_text(run_dir: Path, text: str, cfg: ReadConfig | None = None,
              subject: Any = None) -> dict[str, Any]:
    """Per token, the firing units with their words; and a summary over the whole text."""
    import torch

    from neuroscribe.models import capture, load_subject, run_to_hooks
    from neuroscribe.runs import load_stage

    cfg = cfg or ReadConfig()
    run_dir = Path(run_dir)
    rec = load_stage(run_dir, "record")
    if not rec.get("complete"):
        raise UserError(f"{run_dir}: the record stage did not finish; rerun it")
    subject = subject or load_subject(rec["config"]["model"], "cpu", "float32")
    hookpoints: list[str] = rec["hookpoints"]
    infos = {hp: load_unit_info(run_dir, hp, cfg.quantile) for hp in hookpoints}
    ids = subject.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("nothing to read: the text is empty")
    strings = [subject.tokenizer.decode([i]) for i in ids]
    hits: list[list[dict[str, Any]]] = [[] for _ in ids]
    device = next(subject.model.parameters()).device
    with capture(subject.model, hookpoints) as store, torch.inference_mode():
        for start in range(0, len(ids), cfg.window):
            window = torch.tensor([ids[start:start + cfg.window]], device=device)
            acts = run_to_hooks(subject.model, window, store)
            for hp in hookpoints:
                info = infos[hp]
                pos, unit, val = _firing(acts[hp][0], info, cfg.all_units)
                thr = info.thresholds[unit]
                for p, u, v, t in zip(pos.tolist(), unit.tolist(), val.tolist(), thr.tolist()):
                    words, score = info.words(u)
                    if words is None and not cfg.all_units:  # a failed explanation
                        continue
                    hits[start + p].append({
                        "hookpoint": hp, "unit": u, "activation": round(v, 4),
                        "strength": round(v / t, 3), "explanation": words, "score": score})
    tokens = [{"token": s, "units": sorted(h, key=lambda d: -d["strength"])[:cfg.top]}
              for s, h in zip(strings, hits)]
    return {"run": str(run_dir), "quantile": cfg.quantile, "tokens": tokens,
            "summary": summarize(hits, cfg.summary_top)}


def summarize(hits: list[list[dict[str, Any]]], top: int) -> list[dict[str, Any]]:
    """The units most active over the text: summed strength over the tokens where they fire."""
    agg: dict[tuple[str, int], dict[str, Any]] = {}
    for i, token_hits in enumerate(hits):
        for h in token_hits:
            a = agg.setdefault((h["hookpoint"], h["unit"]), {
                **{k: h[k] for k in ("hookpoint", "unit", "explanation", "score")},
                "total_strength": 0.0, "n_tokens": 0, "tokens": []})
            a["total_strength"] = round(a["total_strength"] + h["strength"], 3)
            a["n_tokens"] += 1
            a["tokens"].append(i)
    return sorted(agg.values(), key=lambda a: -a["total_strength"])[:top]
