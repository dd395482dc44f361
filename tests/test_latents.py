"""SAE latents as units: hookpoint syntax, the sparse recorder, delphi's cache layout, memory."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from neuroscribe.corpus import iter_contexts, iter_texts
from neuroscribe.errors import UserError
from neuroscribe.explain.core import ExplainConfig, explain, explanation_path
from neuroscribe.models import (
    Hookpoint,
    encode_sparse,
    parse_hookpoint,
    resolve_hookpoints,
    safe_name,
)
from neuroscribe.pipeline import ScoreConfig, score, score_path
from neuroscribe.record.core import (
    QUANTILES,
    RecordConfig,
    RecordStore,
    UnitRecorder,
    latents_dir,
    record,
    store_path,
)
from neuroscribe.record.latent_cache import LatentCache, split_bounds
from neuroscribe.record.latents import ContextTopK, LatentRecorder
from neuroscribe.sae.model import Sae, SaeConfig

HP = "transformer.h.0.mlp.act"  # 64 units in the tiny GPT-2
N_LATENTS, K = 96, 4
SMALL = dict(max_tokens=3000, ctx_len=32, batch_size=16, quantile_warmup=8, n_top=12,
             n_random=9, n_quantile=2, latent_splits=3)


def make_sae(folder: Path, d_in: int = 64, n_latents: int = N_LATENTS, k: int = K) -> Sae:
    torch.manual_seed(3)
    sae = Sae(SaeConfig(d_in=d_in, n_latents=n_latents, architecture="topk", k=k))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_(0, 0.1)
    sae.save(folder)
    return sae


@pytest.fixture(scope="module")
def sae_run(tiny_model: Path, corpus_file: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One record of ``HP:sae=FOLDER``, and the dense latents of every context, computed
    directly: the model's raw activations at HP through ``sae.encode``."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("sae-run")
    sae = make_sae(tmp / "sae")
    hp = f"{HP}:sae={tmp / 'sae'}"
    cfg = RecordConfig(model=str(tiny_model), hookpoints=hp, corpus=str(corpus_file), **SMALL)
    record(cfg, tmp / "run")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = torch.tensor(list(iter_contexts(iter_texts(str(corpus_file)), tok, cfg.ctx_len,
                                          cfg.max_tokens)))
    dense = encode_directly(tiny_model, ids, sae)  # [contexts, T, latents]
    return {"run": tmp / "run", "hp": hp, "cfg": cfg, "ids": ids, "dense": dense, "sae": sae}


def encode_directly(model_path: Path, ids: torch.Tensor, sae: Sae) -> torch.Tensor:
    """The latents [B, T, latents] of ids [B, T]: the model's raw activations at HP through
    ``sae.encode``, without neuroscribe's hooks."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_path).eval()
    raw: list[torch.Tensor] = []
    handle = model.get_submodule(HP).register_forward_hook(lambda m, a, out: raw.append(out))
    with torch.no_grad():
        model(input_ids=ids)
        dense = sae.encode(raw[0])
    handle.remove()
    return dense


# --- hookpoint syntax ------------------------------------------------------------------------


def test_hookpoint_parses_and_prints_back() -> None:
    cases = {"a.b": Hookpoint("a.b"), "a.b:input": Hookpoint("a.b", "input"),
             "a.b:output:sae=/x/y": Hookpoint("a.b", "output", "/x/y"),
             "a.b:sae=hf://o/r/layers.3": Hookpoint("a.b", sae="hf://o/r/layers.3"),
             "a.b:input:sae=../s:1": Hookpoint("a.b", "input", "../s:1")}
    for spec, want in cases.items():
        assert parse_hookpoint(spec) == want
        assert str(want) == spec
    for bad, msg in {"a.b:inptu": "option 'inptu' unknown", "a.b:sae=": "needs an SAE folder",
                     "a.b:sae": "needs an SAE folder", "a.b:input:output": "one of :input"
                     }.items():
        with pytest.raises(UserError, match=msg):
            parse_hookpoint(bad)


def test_safe_name_is_flat_stable_and_distinct() -> None:
    assert safe_name("a.b") == "a.b" and safe_name("a.b:input") == "a.b__input"
    names = {safe_name(f"a.b:sae={f}") for f in ("../../etc", "/x/sae", "/y/sae", "sae", "/x/sae/")}
    assert len(names) == 5
    for n in names:
        assert "/" not in n and ":" not in n and not n.startswith(".") and n.startswith("a.b__sae-")
    assert re.fullmatch(r"a\.b__input__sae-layers\.3-[0-9a-f]{10}",
                        safe_name("a.b:input:sae=/x/layers.3"))


def test_safe_name_hand_written_values() -> None:
    """Exact names: ':' becomes '__'; an SAE folder becomes its last name, cleaned, plus the
    first 10 hex digits of sha256 of the whole folder string (hashlib.sha256(b"/x/sae") is
    3f8300d143...), so folders with the same last name do not collide."""
    want = {
        "a.b": "a.b",
        "a.b:input": "a.b__input",
        "a.b:output": "a.b__output",
        "a.b:sae=/x/sae": "a.b__sae-sae-3f8300d143",
        "a.b:sae=/y/sae": "a.b__sae-sae-ac9cbbefdb",  # same name "sae", another folder
        "a.b:sae=/x/sae/": "a.b__sae-sae-6a68d064c0",  # a trailing '/' is another string
        "a.b:sae=sae": "a.b__sae-sae-988d09baad",
        "a.b:sae=../../etc": "a.b__sae-etc-74ccf3c5b4",  # no '..' or '/' survives
        "a.b:sae=..": "a.b__sae-5ec1f7e700",  # a name of dots only: the hash alone
        "a.b:sae=/x/my sae:v1": "a.b__sae-my-sae-v1-c23ff97c74",  # ' ' and ':' become '-'
        "a.b:input:sae=/x/layers.3": "a.b__input__sae-layers.3-4aceeef243",
        "a.b:sae=hf://o/r/layers.3": "a.b__sae-layers.3-4ef01e72f9",
        # a long folder name keeps its last 40 characters
        f"a.b:sae=/x/{'y' * 10}{'z' * 40}": f"a.b__sae-{'z' * 40}-9a7d08e940",
    }
    assert {hp: safe_name(hp) for hp in want} == want


def test_resolve_keeps_sae_and_checks_folder(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_model)
    (tmp_path / "sae").mkdir()
    got = resolve_hookpoints(model, [f"transformer.h.*.mlp.act:sae={tmp_path / 'sae'}"])
    assert got == [f"transformer.h.{i}.mlp.act:sae={tmp_path / 'sae'}" for i in (0, 1)]
    with pytest.raises(UserError, match=re.escape(f"SAE folder not found: {tmp_path / 'nope'}")):
        resolve_hookpoints(model, [f"{HP}:sae={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="option 'sea' unknown"):
        resolve_hookpoints(model, [f"{HP}:sea={tmp_path}"])


def test_d_in_mismatch_names_both_sizes(tiny_model: Path, corpus_file: Path,
                                        tmp_path: Path) -> None:
    make_sae(tmp_path / "sae32", d_in=32)
    hp = f"{HP}:sae={tmp_path / 'sae32'}"
    cfg = RecordConfig(model=str(tiny_model), hookpoints=hp, corpus=str(corpus_file), **SMALL)
    msg = f"SAE at {tmp_path / 'sae32'} expects d_in=32 but hookpoint {hp} gives 64 units"
    with pytest.raises(UserError, match=re.escape(msg)):
        record(cfg, tmp_path / "run")


def test_encode_sparse_is_encode(tmp_path: Path) -> None:
    sae = make_sae(tmp_path / "s", d_in=8, n_latents=50, k=3)
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        assert torch.equal(encode_sparse(sae, x, "h").to_dense(), sae.encode(x))


# --- records of SAE latents --------------------------------------------------------------------


def test_records_are_sae_encode_of_the_raw_activations(sae_run: dict[str, Any]) -> None:
    run, hp, cfg, dense = sae_run["run"], sae_run["hp"], sae_run["cfg"], sae_run["dense"]
    store = RecordStore(run)
    assert store.hookpoints == [hp] and store.units == {hp: N_LATENTS}
    assert store_path(run, hp).name == f"{safe_name(hp)}.safetensors"
    ids = sae_run["ids"]
    ctx_max = dense.amax(1)  # [contexts, latents]
    flat = dense.reshape(-1, N_LATENTS).double().numpy()
    checked = 0
    for u in range(N_LATENTS):
        t = store.unit_tensors(hp, u)
        for kind in ["top", "random", *(f"q{i}" for i in range(len(QUANTILES) - 1))]:
            ctx = t[f"{kind}_ctx"]
            for j in range(len(ctx)):
                c = int(ctx[j])
                if c < 0:
                    assert not t[f"{kind}_acts"][j].any()
                    continue
                torch.testing.assert_close(t[f"{kind}_acts"][j], dense[c, :, u])
                assert torch.equal(t[f"{kind}_tokens"][j], ids[c].to(torch.int32))
                checked += 1
        # the top records: the best active contexts, best first, up to n_top (ties in any order)
        want = ctx_max[:, u][ctx_max[:, u] > 0].sort(descending=True).values[: cfg.n_top]
        top = t["top_ctx"][t["top_ctx"] >= 0]
        torch.testing.assert_close(ctx_max[top, u], want)
        rnd = t["random_ctx"][t["random_ctx"] >= 0]
        assert not set(rnd.tolist()) & set(top.tolist())
        assert len(rnd) == min(cfg.n_random, len(ids) - len(top))
        mean, var = flat[:, u].mean(), flat[:, u].var()
        assert float(t["mean"]) == pytest.approx(mean, rel=1e-5, abs=1e-7)
        assert float(t["variance"]) == pytest.approx(var, rel=1e-5, abs=1e-7)
        assert int(t["hist_counts"].sum()) == flat.shape[0]
    assert checked > N_LATENTS * cfg.n_top  # most units have full top and random samples
    nr = store.neuron_record(hp, 0)
    assert nr.neuron_id.layer_index == 0
    assert nr.most_positive_activation_records[0].activations == dense[
        int(store.unit_tensors(hp, 0)["top_ctx"][0]), :, 0].tolist()


def test_explain_and_score_read_sae_records(sae_run: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sae_run["run"], run)
    explain(ExplainConfig(units="first:3"), run)
    score(ScoreConfig(simulator="tokens"), run)
    for u in range(3):
        path = explanation_path(run, sae_run["hp"], u)
        assert json.loads(path.read_text())["unit"] == u
        assert score_path(run, sae_run["hp"], u).is_file()
        assert path.parent.parent == run / "explanations"  # one flat folder per hookpoint


def test_read_lists_sae_latents_as_sae_encode_computes_them(sae_run: dict[str, Any],
                                                          tmp_path: Path) -> None:
    """``neuroscribe read`` on an SAE-latent run: every latent it lists on a token is active
    there, with the activation that the model's raw activations through ``sae.encode`` give."""
    import shutil

    from neuroscribe.models import load_subject
    from neuroscribe.read.core import ReadConfig, read_text

    run = tmp_path / "run"
    shutil.copytree(sae_run["run"], run)
    explain(ExplainConfig(units="all"), run)
    rec = json.loads((run / "record.json").read_text())
    subject = load_subject(rec["config"]["model"])
    text = "the cat sat on the mat while red birds sang. the blue ships came over the sea!"
    res = read_text(run, text, ReadConfig(top=1000, quantile=0.5, all_units=True),
                    subject=subject)
    ids = torch.tensor([subject.tokenizer(text, add_special_tokens=False)["input_ids"]])
    dense = encode_directly(Path(rec["config"]["model"]), ids, sae_run["sae"])[0]  # [T, latents]
    assert len(res["tokens"]) == dense.shape[0]
    listed = [(i, u["unit"], u["activation"]) for i, t in enumerate(res["tokens"])
              for u in t["units"]]
    assert listed and all(u["hookpoint"] == sae_run["hp"] for t in res["tokens"]
                          for u in t["units"])
    for i, u, v in listed:
        assert float(dense[i, u]) > 0
        assert v == pytest.approx(float(dense[i, u]), abs=1e-3)
    assert any(u["explanation"] for t in res["tokens"] for u in t["units"])


def test_latent_recorder_matches_unit_recorder_on_dense(tmp_path: Path) -> None:
    """Same data, same seed: the sparse recorder writes what the dense one does (its top
    records aside, which are active contexts only)."""
    from safetensors.torch import load_file

    cfg = RecordConfig(n_top=3, n_random=4, n_quantile=2, quantile_warmup=20, ctx_len=5,
                       n_hist_bins=8, latent_splits=2)
    g = torch.Generator().manual_seed(5)
    n, u = 38, 7
    acts = torch.rand(n, cfg.ctx_len, u, generator=g) * torch.rand(u, generator=g) * 4
    acts[torch.rand(acts.shape, generator=g) < 0.8] = 0  # sparse; unit 6 almost dead
    acts[..., 6] = 0
    acts[3, 2, 6] = 1.5
    tokens = torch.randint(0, 500, (n, cfg.ctx_len), generator=g, dtype=torch.int32)
    dense = UnitRecorder("h", u, cfg)
    sparse = LatentRecorder("h", u, cfg, tmp_path / "lat")
    start = 0
    for b in [6, 9, 7, 11, 5]:
        sl = slice(start, start + b)
        ctx = torch.arange(start, start + b)
        dense.update(acts[sl], tokens[sl], ctx)
        sparse.update(acts[sl].to_sparse(), tokens[sl], ctx)
        start += b
    want = dense.finished()
    sparse.save(tmp_path / "rec.safetensors", {"hookpoint": "h"})
    got = load_file(str(tmp_path / "rec.safetensors"))
    assert set(got) == set(want)
    filled = {k[:-4]: v >= 0 for k, v in want.items() if k.endswith("_ctx")}
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        kind = key.rsplit("_", 1)[0]
        a, b = got[key], want[key]
        if kind == "top":
            continue
        if kind in filled:  # an empty slot's data is arbitrary in UnitRecorder, zeros here
            assert key.endswith("_ctx") or not a[~filled[kind]].any()
            a, b = a[filled[kind]], b[filled[kind]]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    active = want["top_acts"].amax(2) > 0
    assert torch.equal(got["top_ctx"], torch.where(active, want["top_ctx"], -1))
    assert got["top_ctx"][6].tolist() == [3, -1, -1]


# --- the sparse cache: delphi's layout ----------------------------------------------------------


def test_cache_files_have_delphis_layout_and_round_trip(sae_run: dict[str, Any]) -> None:
    run, hp, dense, ids = sae_run["run"], sae_run["hp"], sae_run["dense"], sae_run["ids"]
    folder = latents_dir(run, hp)
    assert json.loads((run / "record.json").read_text())["latent_caches"] == {
        hp: f"latents/{safe_name(hp)}"}
    config = json.loads((folder / "config.json").read_text())
    assert config["n_splits"] == 3 and config["cache_ctx_len"] == 32
    assert {"model_name", "dataset_repo", "batch_size", "n_tokens"} <= set(config)
    # delphi: boundaries = linspace(0, width, n_splits + 1).long(), files "{start}_{end - 1}"
    edges = torch.linspace(0, N_LATENTS, 4).long().tolist()
    names = [f"{a}_{b - 1}.safetensors" for a, b in zip(edges[:-1], edges[1:])]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "config.json"])
    rebuilt = torch.zeros_like(dense)
    for name in names:
        start = int(name.split("_")[0])
        with safe_open(str(folder / name), framework="np") as f:
            assert set(f.keys()) == {"locations", "activations", "tokens"}
            loc, val, tok = (f.get_tensor(k) for k in ("locations", "activations", "tokens"))
        assert loc.dtype == np.uint16 and val.dtype == np.float16 and tok.dtype == np.int64
        assert loc.shape == (len(val), 3) and np.array_equal(tok, ids.numpy())
        loc = loc.astype(np.int64)
        assert loc[:, 2].max() < edges[1] - edges[0] + 1
        rebuilt[loc[:, 0], loc[:, 1], loc[:, 2] + start] = torch.from_numpy(val).float()
    assert torch.equal(rebuilt != 0, dense != 0)
    torch.testing.assert_close(rebuilt, dense, rtol=1e-3, atol=1e-4)


def test_cache_uses_uint32_when_uint16_does_not_fit(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path / "c", 70_000, 2, 1)
    one = np.array([0])
    cache.add(one, one, np.array([69_999]), np.array([2.5], np.float32), np.ones((1, 2)), one)
    cache.close()
    cache.write_splits({})
    with safe_open(str(tmp_path / "c" / "0_69999.safetensors"), framework="np") as f:
        assert f.get_tensor("locations").dtype == np.uint32
        assert f.get_tensor("locations").tolist() == [[0, 0, 69_999]]
    assert split_bounds(10, 3) == [(0, 2), (3, 5), (6, 9)]


# --- memory ----------------------------------------------------------------------------------


def retained_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors and arrays an object holds, following neuroscribe's objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(retained_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(retained_bytes(v, seen) for v in obj)
    if type(obj).__module__.startswith("neuroscribe"):
        return sum(retained_bytes(v, seen) for v in vars(obj).values())
    return 0


def test_memory_is_bounded_by_latents_times_exemplars(tmp_path: Path) -> None:
    cfg = RecordConfig(n_top=40, n_random=30, n_quantile=5, quantile_warmup=32, ctx_len=64,
                       latent_splits=4)
    u, b, t, k = 16_384, 8, cfg.ctx_len, 8
    rec = LatentRecorder("h", u, cfg, tmp_path / "lat")
    g = torch.Generator().manual_seed(1)
    active = torch.zeros((32 * b, u), dtype=torch.bool)

    def feed(n: int, first: int) -> None:
        for i in range(first, first + n):
            lat = torch.randint(0, u, (b * t, k), generator=g).reshape(-1)
            row = torch.arange(b * t).repeat_interleave(k)
            idx = torch.stack([row // t, row % t, lat])
            active[i * b + idx[0], lat] = True
            acts = torch.sparse_coo_tensor(idx, torch.rand(len(lat), generator=g), (b, t, u),
                                           check_invariants=True)
            rec.update(acts, torch.zeros((b, t), dtype=torch.int32), torch.arange(b) + i * b)

    feed(8, 0)  # through the warm-up (32 contexts)
    after_warmup = retained_bytes(rec)
    feed(24, 8)
    assert retained_bytes(rec) == after_warmup  # nothing grows with the corpus
    slots = cfg.n_top + (cfg.n_top + cfg.n_random) + (len(QUANTILES) - 1) * cfg.n_quantile
    per_latent = (slots * (8 + 8)  # an int64 key and an int64 context id per slot
                  + 4 * 8 + len(QUANTILES) * 4  # moments (float64), quantile boundaries
                  + cfg.n_hist_bins * 8 + (cfg.n_hist_bins + 1) * 4)  # histogram and edges
    bound = u * per_latent + (1 << 16)
    assert after_warmup <= bound
    dense_exemplars = u * slots * t * 4  # UnitRecorder's activations alone
    assert bound * 5 < dense_exemplars
    top = rec.top.finished()  # every active context up to n_top, none that is not
    assert torch.equal((top >= 0).sum(1), active.sum(0).clamp(max=cfg.n_top))
    assert active.gather(0, top.clamp(min=0).T).T[top >= 0].all()


def test_context_topk_keeps_the_best() -> None:
    from neuroscribe.stats import EMPTY, float_keys

    def keys(scores: list[list[float]], ctx: torch.Tensor) -> torch.Tensor:
        s = torch.tensor(scores)
        return torch.where(s > -math.inf, float_keys(s.T, ctx).T, EMPTY)  # -inf: no candidate

    tk = ContextTopK(2, 2)
    c = torch.tensor([10, 11, 12])
    tk.update(keys([[1.0, 3.0, -math.inf], [0.5, -math.inf, -math.inf]], c), c)
    tk.update(keys([[2.0], [-math.inf]], torch.tensor([13])), torch.tensor([13]))
    assert tk.finished().tolist() == [[11, 13], [10, -1]]


def test_latent_recorder_bins_cover_every_context(tmp_path: Path) -> None:
    """As ``UnitRecorder``: with n_quantile >= contexts, the bins together hold every context
    once, those past the warm-up range (the last batch is 10x larger) included."""
    from safetensors.torch import load_file

    cfg = RecordConfig(n_top=2, n_random=2, n_quantile=64, quantile_warmup=8, ctx_len=4,
                       n_hist_bins=4, latent_splits=1)
    g = torch.Generator().manual_seed(2)
    n, u = 30, 5
    acts = torch.rand(n, cfg.ctx_len, u, generator=g)
    acts[torch.rand(acts.shape, generator=g) < 0.5] = 0
    acts[20:] *= 10
    rec = LatentRecorder("h", u, cfg, tmp_path / "lat")
    for start in range(0, n, 10):
        rec.update(acts[start:start + 10].to_sparse(), torch.zeros((10, cfg.ctx_len),
                   dtype=torch.int32), torch.arange(start, start + 10))
    rec.save(tmp_path / "rec.safetensors", {"hookpoint": "h"})
    got = load_file(str(tmp_path / "rec.safetensors"))
    assert float(got["quantile_boundaries"][:, -1].max()) < float(acts[20:].amax())
    for unit in range(u):
        members = [int(c) for i in range(len(QUANTILES) - 1) for c in got[f"q{i}_ctx"][unit]
                   if c >= 0]
        assert sorted(members) == list(range(n)), unit


def test_a_checkpoint_snapshot_cuts_a_killed_attempt_s_spills_back(tmp_path: Path) -> None:
    """What was written after a checkpoint (a killed rank kept going) is cut off on resume,
    so no context is counted twice."""
    from neuroscribe.record.latent_cache import LatentCache, truncate

    cache = LatentCache(tmp_path / "c", 10, 2, 2)

    def batch(c: int) -> None:
        cache.add(np.array([c, c]), np.array([0, 1]), np.array([1, 7]),
                  np.array([0.5, 2.0], np.float32), np.array([[3, 4]]), np.array([c]))

    batch(0)
    snap = cache.snapshot()
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").glob(".*.spill")}
    batch(1)
    cache.close()
    assert any(p.stat().st_size > len(before[p.name]) for p in (tmp_path / "c").glob(".*"))
    truncate(snap)
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").glob(".*.spill")} == before
    assert snap["n_ctx"] == 1 and all(v > 0 for v in snap["sizes"].values())
