"""FIND's evaluation of agents on the function suite (``bench-find``: ``find/cli.py``).

- numeric: the agent's code on x = i + 0.5, i in [-128, 128), against the clean function
  (FIND's ``mse_indicator.py`` loads each folder's ``function_code.py``, whichever variant
  the agent called), skipping points where it is not a finite number; solved when FIND's
  NMSE (squared error over squared truth) < 0.1. Also reported: ``nmse_var`` (normalised by
  the truth's variance, stricter), ``nmse_released`` (against the variant the agent called,
  corruption and noise included; not FIND's) and the IoU of the stated corrupted interval;
- string: exact match of outputs on held-out inputs (solved when all match);
- entity: three-way unit tests (which of three inputs does the description predict to be the
  most selective, judged by sentence embeddings; chance 1/3), solved at >= 80 %;
- puzzle: the description is closer, by embedding, to the true explanation than to each false
  one.

Functions and agent code both run out of process in the sandbox; a function or an answer that
crashes, hangs or is malformed is scored as a failure with its reason, and the run goes on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from neuroscribe.runs import opt

SOLVED_NMSE = 0.1
SOLVED_UNIT_TESTS = 0.8


@dataclass
class FindConfig:
    """Which agents to run on the FIND-style suite, and how."""

    out: str = opt("runs/find", "run folder: suite.json, answers/, find.json and find.txt")
    agents: str = opt("offline", "comma-separated agents: offline (no LLM), baseline "
                      "(single round of random inputs, LLM), aia (LLM agent)")
    max_rounds: int = opt(20, "most experiment rounds of the AIA")
    max_inputs: int = opt(40, "most inputs per AIA experiment")
    n_random: int = opt(20, "random inputs that the baseline and the AIA start from")
    min_rounds: int = opt(1, "experiments the AIA must run before it may answer")
    tools: str = opt("fit", "the AIA's tools besides calling f: fit (least squares fits of "
                     "the op grammar to numeric observations), or '' for none")
    fn_timeout: float = opt(30.0, "wall-clock seconds per call of a function")
    code_timeout: float = opt(10.0, "wall-clock seconds to run an answer's code")
    memory_mb: int = opt(1024, "memory limit of sandboxed code in MiB")
    sandbox: str = opt("bwrap", "isolation of functions and agent code: bwrap (kernel "
                       "namespaces) or none (explicit opt-out, not safe)")
    n_heldout: int = opt(40, "held-out inputs per string function")
    n_unit_tests: int = opt(10, "three-way unit tests per entity neuron")
    suite: str = opt("", "instead of generating one: a saved suite.json, or find:DIR for a "
                     "folder in FIND's own layout (data.json + fNNNNN/function_code.py)")
    find_variant: str = opt("released", "with find:DIR, which numeric file to run: released "
                            "(func_name_dict.json, else function_code.py), clean, corrupted, "
                            "noised")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def kept_points(truth: list[Any], pred: list[Any]) -> tuple[list[float], list[Any]]:
    """FIND's rule: a point counts only where the truth is a finite number (NaN, inf and no
    value are skipped); the prediction is kept as it is."""
    pairs = [(float(t), p) for t, p in zip(truth, pred) if _finite(t)]
    return [t for t, _ in pairs], [p for _, p in pairs]


def nmse(truth: list[Any], pred: list[Any]) -> float:
    """FIND's NMSE (``mse_indicator.py``): the squared error over the squared truth,
    sum((t - p)^2) / sum(t^2), on the points where the truth is finite. NaN when no point
    is left or the truth is 0 everywhere (FIND scores both as a failure); inf when a kept
    prediction is not a finite number."""
    t, p = kept_points(truth, pred)
    if not t:
        return math.nan
    if not all(_finite(v) for v in p):
        return math.inf
    ss = sum(v * v for v in t)
    return sum((a - float(b)) ** 2 for a, b in zip(t, p)) / ss if ss > 0 else math.nan


def nmse_var(truth: list[Any], pred: list[Any]) -> float:
    """The stricter figure: the mean squared error over the truth's variance (its mean
    square when it is constant), on the same points. A function with a large offset passes
    FIND's NMSE with its shape wrong; this figure does not let it."""
    t, p = kept_points(truth, pred)
    if not t:
        return math.nan
    if not all(_finite(v) for v in p):
        return math.inf
    n, mean = len(t), sum(t) / len(t)
    var = sum((v - mean) ** 2 for v in t) / n
    scale = var if var > 1e-12 else max(sum(v * v for v in t) / n, 1e-12)
    return sum((a - float(b)) ** 2 for a, b in zip(t, p)) / n / scale


def interval_iou(a: list[float] | None, b: list[float] | None,
                 domain: tuple[float, float] = (-128.0, 128.0)) -> float:
    """IoU of two intervals clipped to the domain; 1 when both are absent."""
    if a is None or b is None:
        return float(a is None and b is None)
    (a0, a1), (b0, b1) = [(max(lo, domain[0]), min(hi, domain[1])) for lo, hi in (a, b)]
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = max(a1, b1) - min(a0, b0) if inter else (a1 - a0) + (b1 - b0)
    return inter / union if union > 0 else 0.0


class Evaluator:
    """Scores answers; ``truth`` runs a suite function's ``f_truth`` out of process."""

    def __init__(self, cfg: FindConfig, truth: Callable[..., list[Any]],
                 run_answer: Callable[[str, list[Any]], Any],
                 embed: Callable[[list[str]], Any] | None = None) -> None:
        self.cfg, self.truth, self.run_answer = cfg, truth, run_answer
        self._embed: Any = embed
        self.scorers: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
            "numeric": self.numeric, "string": self.string, "entity": self.entity,
            "puzzle": self.puzzle}

    def embed(self, texts: list[str]) -> Any:
        if self._embed is None:
            from neuroscribe.simulate.core import Embedder

            self._embed = Embedder()
        return self._embed(texts)

    def _outputs(self, code: str, xs: list[Any]) -> tuple[list[Any] | None, str]:
        r = self.run_answer(code, xs)
        return (r.outputs, "") if r.ok else (None, f"the answer's code failed ({r.status}): "
                                                   f"{r.reason}")

    def numeric(self, fn: Any, ans: Any) -> dict[str, Any]:
        from neuroscribe.find.function import eval_points

        xs = eval_points()
        truth = self.truth(fn, xs)
        iou = interval_iou(ans.interval, fn.interval)
        kept = sum(_finite(t) for t in truth)
        if not kept:
            return {"solved": False, "iou": iou, "nmse": None,
                    "failure": "the function gives no finite value at FIND's points"}
        pred, why = self._outputs(ans.code, xs)
        if pred is None:
            return {"solved": False, "failure": why, "iou": iou}
        e, ev = nmse(truth, pred), nmse_var(truth, pred)
        er = e if fn.params.get("variant", "clean") == "clean" else nmse(
            self.truth(fn, xs, "f"), pred)
        out = {"solved": e < SOLVED_NMSE, "nmse": e if math.isfinite(e) else None,
               "nmse_var": ev if math.isfinite(ev) else None,
               "nmse_released": er if math.isfinite(er) else None, "iou": iou, "points": kept}
        if math.isinf(e):
            bad = sum(not _finite(p) for _, p in zip(*kept_points(truth, pred)))
            out["failure"] = f"the answer's code gave no number for {bad} of {kept} inputs"
        elif math.isnan(e):
            out["failure"] = "the function is 0 at every point FIND keeps (FIND: no score)"
        return out

    def string(self, fn: Any, ans: Any) -> dict[str, Any]:
        from neuroscribe.find.agents import load_data

        if tests := fn.params.get("unit_tests"):  # FIND's own unit tests (find:DIR)
            pred, why = self._outputs(ans.code, [i for i, _ in tests])
            if pred is None:
                return {"solved": False, "failure": why}
            match = sum(p == o for p, (_, o) in zip(pred, tests)) / len(tests)
            return {"solved": match == 1.0, "exact_match": match}
        rng = random.Random(f"heldout-{fn.id}")
        words = load_data("words.json")["random_words"]
        xs = [" ".join(rng.sample(words, rng.randint(1, 3))) if i % 2 else
              "".join(rng.choice("abcdefghijklmnopqrstuvwxyz  ABC") for _ in range(12))
              for i in range(self.cfg.n_heldout)]
        truth = self.truth(fn, xs)
        pred, why = self._outputs(ans.code, xs)
        if pred is None:
            return {"solved": False, "failure": why}
        match = sum(t == p for t, p in zip(truth, pred)) / len(xs)
        return {"solved": match == 1.0, "exact_match": match}

    def entity(self, fn: Any, ans: Any) -> dict[str, Any]:
        from neuroscribe.find.agents import load_data

        concepts = load_data("concepts.json")
        rng = random.Random(f"unit-tests-{fn.id}")
        mine = [w for c in fn.params["concepts"] for w in concepts[c][6:]]
        other = [w for c, ws in concepts.items() if c not in fn.params["concepts"] for w in ws]
        tests = [rng.sample(other, 2) + [rng.choice(mine)] for _ in range(self.cfg.n_unit_tests)]
        for t in tests:
            rng.shuffle(t)
        flat = [w for t in tests for w in t]
        acts = self.truth(fn, flat)
        vecs = self.embed([ans.description, *flat])
        sims = [float(vecs[0] @ v) for v in vecs[1:]]
        right = 0
        for k in range(len(tests)):
            a, s = acts[3 * k: 3 * k + 3], sims[3 * k: 3 * k + 3]
            right += max(range(3), key=lambda i: s[i]) == max(range(3), key=lambda i: a[i])
        acc = right / len(tests)
        return {"solved": acc >= SOLVED_UNIT_TESTS, "unit_test_accuracy": acc}

    def puzzle(self, fn: Any, ans: Any) -> dict[str, Any]:
        from neuroscribe.groundtruth.puzzles import Puzzle, closer_to_truth

        p = Puzzle(fn.op, fn.description, fn.params["false_explanations"], [])
        ok, sims = closer_to_truth(self.embed, ans.description, p)
        return {"solved": ok, "similarities": sims}

    def score(self, fn: Any, ans: Any) -> dict[str, Any]:
        if ans.failure:
            return {"solved": False, "failure": ans.failure,
                    **({"iou": interval_iou(None, fn.interval)} if fn.category == "numeric"
                       else {})}
        try:
            return self.scorers[fn.category](fn, ans)
        except Exception as e:  # noqa: BLE001 - a broken function or answer is one failure
            return {"solved": False, "failure": f"evaluation failed: {type(e).__name__}: {e}"}
