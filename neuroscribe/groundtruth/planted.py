"""Planted neurons: check the whole neuron pipeline on units whose function is known.

K units of one MLP activation hookpoint (SmolLM2-135M ``model.layers.3.mlp.act_fn`` by default)
are overwritten by planted neurons: each fires at ``strength`` on the tokens its concept's rule
accepts (colour words, digits, month names, closing brackets, a word after "the", ...) and is 0
elsewhere. The rule is a lookup on the input token ids, applied by a forward hook on that module
that runs before any other hook, so recording the hookpoint sees the planted units exactly as it
sees every other unit. Then ``record -> explain -> score`` runs as on any layer, and concept
recovery is the fraction of planted units whose explanation is judged closer to the true
description than to every distractor (by MiniLM embeddings, and optionally by an LLM).
Concepts are data: ``neuroscribe/data/planted/concepts.json``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.runs import opt

Matcher = Callable[[str], bool]


def _words(values: Sequence[str]) -> Matcher:
    words = {v.lower() for v in values}
    return lambda tok: tok.strip().lower() in words


def _cased(values: Sequence[str]) -> Matcher:
    words = set(values)
    return lambda tok: tok.strip() in words


def _regex(pattern: str) -> Matcher:
    rx = re.compile(pattern)
    return lambda tok: rx.search(tok) is not None


# How a token is tested: {"words": [...]}, {"cased": [...]} or {"regex": "..."}.
MATCHERS: dict[str, Callable[[Any], Matcher]] = {"words": _words, "cased": _cased,
                                                 "regex": _regex}


def compile_matcher(spec: Any, where: str) -> Matcher:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"{where}: a matcher is one of {sorted(MATCHERS)} with its value")
    ((kind, value),) = spec.items()
    if kind not in MATCHERS:
        raise UserError(f"{where}: unknown matcher {kind!r}; have {sorted(MATCHERS)}")
    try:
        return MATCHERS[kind](value)
    except (re.error, TypeError) as e:
        raise UserError(f"{where}: bad {kind} matcher: {e}") from e


@dataclass(frozen=True)
class Concept:
    """A planted neuron's function: its true description, distractors and firing rule."""

    name: str
    description: str
    distractors: tuple[str, ...]
    token: Matcher
    previous: Matcher | None = None  # the preceding token (in the same context) must match

    def fires(self, tokens: Sequence[str]) -> list[bool]:
        """The rule on a token list: where this planted neuron fires."""
        prev = self.previous
        return [self.token(t) and (prev is None or (i > 0 and prev(tokens[i - 1])))
                for i, t in enumerate(tokens)]


def load_concepts(path: str = "") -> list[Concept]:
    """The concepts of a JSON file (``concepts.json``'s format; default: the packaged one)."""
    if path and not Path(path).is_file():
        raise UserError(f"concepts file not found: {path}")
    text = (Path(path).read_text() if path else
            resources.files("neuroscribe").joinpath("data/planted/concepts.json").read_text())
    try:
        raw = json.loads(text)["concepts"]
        out = [Concept(d["name"], d["description"], tuple(d["distractors"]),
                       compile_matcher(d["token"], f"concept {d['name']} token"),
                       compile_matcher(d["previous"], f"concept {d['name']} previous")
                       if d.get("previous") else None) for d in raw]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"concepts file {path or 'concepts.json'} is malformed: "
                        f"{type(e).__name__}: {e}") from e
    names = [c.name for c in out]
    if len(set(names)) != len(names) or not all(c.description and c.distractors for c in out):
        raise UserError("concepts need unique names, a description and at least one distractor")
    return out


@dataclass
class PlantedConfig:
    """Which neurons to plant, where, and how to judge their explanations."""

    concepts: str = opt("", "concepts JSON file (default: neuroscribe/data/planted/concepts.json)")
    n_planted: int = opt(0, "concepts to plant, first N of the file (0: all of them)")
    strength: float = opt(4.0, "activation of a planted neuron where its rule fires (0 elsewhere)")
    plant_seed: int = opt(0, "seed of the choice of the overwritten units")
    interleave: bool = opt(True, "interleave the corpus files line by line into RUN/corpus.txt "
                           "first, so that --max-tokens reads from every file")
    judges: str = opt("embedding", "comma-separated recovery judges: embedding (MiniLM cosine), "
                      "llm (the explainer's LLM picks among the shuffled descriptions)")


@dataclass
class Planting:
    """Planted units at one hookpoint; ``remove`` takes the hooks off the model."""

    hookpoint: str
    units: list[int]
    concepts: list[Concept]
    strength: float
    handles: list[Any]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def rule_tables(concepts: Sequence[Concept], vocab: Sequence[str]) -> tuple[Any, Any, Any]:
    """Vocabulary lookups [V, K]: token matches, previous-token matches, and [K] whether a
    concept may fire at a context's first position (only when it has no previous rule)."""
    import torch

    tok = torch.tensor([[c.token(t) for c in concepts] for t in vocab], dtype=torch.bool)
    prev = torch.tensor([[c.previous is None or c.previous(t) for c in concepts] for t in vocab],
                        dtype=torch.bool)
    first = torch.tensor([c.previous is None for c in concepts], dtype=torch.bool)
    return tok, prev, first


def planted_values(ids: Any, tables: tuple[Any, Any, Any], strength: float) -> Any:
    """Planted activations [B, T, K] of token ids [B, T]."""
    import torch

    tok, prev, first = (t.to(ids.device) for t in tables)
    b, k = ids.shape[0], tok.shape[1]
    prev_ok = torch.cat([first.expand(b, 1, k), prev[ids[:, :-1]]], dim=1)
    return (tok[ids] & prev_ok).float() * strength


def choose_units(n_units: int, k: int, seed: int) -> list[int]:
    if k > n_units:
        raise UserError(f"cannot plant {k} neurons in a hookpoint of {n_units} units")
    return sorted(random.Random(seed).sample(range(n_units), k))


def count_units(model: Any, hookpoint: str) -> int:
    """The hookpoint's width, from a one-token forward pass."""
    import torch

    from neuroscribe.models import capture, run_to_hooks

    with capture(model, [hookpoint]) as store, torch.inference_mode():
        acts = run_to_hooks(model, torch.zeros((1, 1), dtype=torch.long,
                                                device=next(model.parameters()).device), store)
    return int(acts[hookpoint].shape[-1])


def plant(subject: Any, hookpoint: str, concepts: Sequence[Concept], strength: float,
          seed: int = 0) -> Planting:
    """Overwrite ``len(concepts)`` units of a module's output with planted neurons."""
    import torch

    from neuroscribe.models import parse_hookpoint, resolve_hookpoints

    model = subject.model
    hp = parse_hookpoint(hookpoint)
    if hp.where == "input" or hp.sae or "," in hookpoint or "*" in hookpoint:
        raise UserError(f"plant at one module's output, not {hookpoint!r}")
    resolve_hookpoints(model, [hookpoint])  # a clear error for an unknown module
    units = choose_units(count_units(model, hookpoint), len(concepts), seed)
    tables = rule_tables(concepts, subject.token_strings())
    seen: dict[str, Any] = {}

    def remember(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def overwrite(_mod: Any, _args: tuple[Any, ...], out: Any) -> Any:
        ids = seen.get("ids")
        if ids is None or tuple(ids.shape) != tuple(out.shape[:2]):
            raise UserError(f"planted neurons at {hookpoint} need the input_ids of the pass")
        idx = torch.tensor(units, device=out.device)
        return out.index_copy(-1, idx, planted_values(ids, tables, strength).to(out.dtype))

    module = dict(model.named_modules())[hp.path]
    handles = [model.register_forward_pre_hook(remember, with_kwargs=True, prepend=True),
               module.register_forward_hook(overwrite, prepend=True)]
    return Planting(hookpoint, units, list(concepts), strength, handles)


def interleave_corpus(spec: str, path: Path) -> str:
    """Write the lines of the corpus files to ``path``, each next line from the file that has
    given the fewest characters so far; return the corpus spec to record (``spec`` itself for
    one file or a hub dataset)."""
    from neuroscribe.corpus import resolve_files
    from neuroscribe.runs import atomic_write_text

    files = [] if spec.startswith("hf:") else resolve_files(spec)
    if len(files) < 2 or path.exists():
        return str(path) if path.exists() else spec
    lines = [iter(f.read_text(encoding="utf-8", errors="replace").splitlines()) for f in files]
    given, out, live = [0] * len(files), [], set(range(len(files)))
    while live:
        i = min(live, key=given.__getitem__)
        if (line := next(lines[i], None)) is None:
            live.discard(i)
        elif line.strip():
            out.append(line)
            given[i] += len(line)
    atomic_write_text(path, "\n".join(out) + "\n")
    return str(path)
