"""A FIND-style function suite (Schwettmann et al. 2023), generated from a seed and saved as data.

Every function carries its ground-truth description, its domain (with the interval where it
misbehaves), reference Python code defining ``f`` (what an agent may call, noise included) and
``f_truth`` (the truth it is scored against), and the parameters that made it.

- numeric: drawn as FIND's generator draws them (``find_numeric``): 16 families, sums and
  products of two, and FIND's clean, corrupted and noised variants;
- string: drawn as FIND's string generator draws them (``find_strings``): 67 families, 70% of
  them composed as outer(inner(s));
- entity: scalar functions of a word or phrase, selective for one or two concepts through
  all-MiniLM-L6-v2 sentence embeddings (the sandbox's ``embed`` helper), with noise;
- puzzle: OpenAI's 19 neuron puzzles, ``f(i)`` giving sentence ``i`` as [token, activation].
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import neuroscribe.find.numeric as find_numeric
import neuroscribe.find.strings as find_strings
from neuroscribe.errors import UserError
from neuroscribe.find.function import FindFunction
from neuroscribe.runs import opt, write_json

DATA = Path(__file__).parents[1] / "data" / "find"


@dataclass
class SuiteConfig:
    """Which functions the FIND-style suite holds."""

    seed: int = opt(0, "seed of the suite: the same seed gives the same functions")
    n_numeric: int = opt(60, "numeric functions")
    n_string: int = opt(20, "string transformations")
    n_entity: int = opt(10, "synthetic entity neurons")
    puzzles: str = opt("packaged", "OpenAI's puzzles.json for the token-activation category "
                       "('packaged': the copy shipped with neuroscribe; '' to skip)")
    p_corrupt: float = opt(0.225, "fraction of numeric functions with a corrupted interval "
                           "(FIND's release: 191 of 850)")
    p_noise: float = opt(0.207, "fraction of numeric functions with noise (FIND's release: "
                         "176 of 850); the rest are clean")


def numeric_function(rng: random.Random, i: int, cfg: SuiteConfig) -> FindFunction:
    return find_numeric.numeric_function(rng, i, cfg.p_corrupt, cfg.p_noise)


def _load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def string_function(rng: random.Random, i: int) -> FindFunction:
    return find_strings.string_function(rng, i)


def entity_function(rng: random.Random, i: int, cfg: SuiteConfig) -> FindFunction:
    """Selective for one or two concepts: 10 x the best cosine similarity of the input to a
    concept's centroid above a threshold, plus normal noise."""
    concepts = _load("concepts.json")
    chosen = rng.sample(sorted(concepts), 1 if rng.random() < 0.6 else 2)
    train = {c: concepts[c][:6] for c in chosen}
    noise = round(rng.uniform(0.05, 0.3), 2)
    code = "\n".join([
        "import random", f"_rng = random.Random({rng.randrange(2**31)})",
        f"CONCEPTS = {json.dumps(train)}", "_C = []", "",
        "def f_truth(x):", "    if not _C:",
        "        for words in CONCEPTS.values():",
        "            v = embed(words).mean(0)", "            _C.append(v / float((v @ v) ** 0.5))",
        "    v = embed([str(x)])[0]", "    s = max(float(v @ c) for c in _C)",
        "    return round(10.0 * max(0.0, (s - 0.35) / 0.65), 3)", "",
        "def f(x):", f"    return max(0.0, f_truth(x) + _rng.gauss(0.0, {noise}))", ""])
    names = " or ".join(c.replace("_", " ") for c in chosen)
    return FindFunction(f"entity-{i:04d}", "entity", "+".join(chosen),
                        f"fires on words and phrases related to {names}",
                        "words and phrases", code,
                        {"concepts": chosen, "noise_sd": noise, "threshold": 0.35})


def puzzle_functions(path: str) -> list[FindFunction]:
    from neuroscribe.groundtruth.puzzles import load_puzzles

    out = []
    for j, p in enumerate(load_puzzles(path)):
        data = [[[t, a] for t, a in zip(r.tokens, r.activations)] for r in p.records]
        code = (f"DATA = {json.dumps(data)}\n\ndef f(i):\n    return DATA[int(i) % len(DATA)]\n"
                "\nf_truth = f\n")
        out.append(FindFunction(f"puzzle-{j:04d}", "puzzle", p.name, p.explanation,
                                f"sentence index 0..{len(data) - 1}; returns its tokens with "
                                "activations", code,
                                {"false_explanations": p.false_explanations,
                                 "n_sentences": len(data)}))
    return out


def make_suite(cfg: SuiteConfig) -> list[FindFunction]:
    """The same seed always gives the same functions (each category has its own stream)."""
    fns = [numeric_function(random.Random(f"{cfg.seed}-numeric-{i}"), i, cfg)
           for i in range(cfg.n_numeric)]
    fns += [string_function(random.Random(f"{cfg.seed}-string-{i}"), i)
            for i in range(cfg.n_string)]
    fns += [entity_function(random.Random(f"{cfg.seed}-entity-{i}"), i, cfg)
            for i in range(cfg.n_entity)]
    if cfg.puzzles:
        if cfg.puzzles != "packaged" and not Path(cfg.puzzles).is_file():
            raise UserError(f"puzzles file not found: {cfg.puzzles} (pass --puzzles '' to skip)")
        fns += puzzle_functions(cfg.puzzles)
    return fns


def save_suite(fns: list[FindFunction], cfg: SuiteConfig, path: Path) -> None:
    write_json(path, {"config": asdict(cfg), "functions": [asdict(f) for f in fns]})


def saved_config(path: Path) -> SuiteConfig | None:
    """The config a saved suite.json was made with (None for a file without one)."""
    cfg = json.loads(path.read_text()).get("config") if path.is_file() else None
    return SuiteConfig(**cfg) if isinstance(cfg, dict) else None


def load_suite(path: Path) -> list[FindFunction]:
    if not path.is_file():
        raise UserError(f"suite file not found: {path}")
    fns = [FindFunction(**d) for d in json.loads(path.read_text())["functions"]]
    # suites saved before the truth was named f_truth called it f_clean
    return [dataclasses.replace(f, code=f.code + "\nf_truth = f_clean\n")
            if "f_truth" not in f.code and "f_clean" in f.code else f for f in fns]
