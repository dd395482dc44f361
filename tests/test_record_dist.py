"""record across processes (torchrun, gloo) and resumed from checkpoints: the same files as
one uninterrupted process, byte for byte; and the merge of any split equals the whole."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pipeline import flags

from neuroscribe.record.core import RecordConfig, UnitRecorder, record, shard_size

HP = "transformer.h.0.mlp.act"  # 64 units in the tiny GPT-2
SMALL = dict(max_tokens=6000, ctx_len=16, batch_size=8, quantile_warmup=20, n_top=6,
             n_random=5, n_quantile=3, shard_contexts=32, latent_splits=3, n_hist_bins=16)


def torchrun(n: int, args: list[str], env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
           "--standalone", "-m", "neuroscribe", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # its own process group: a hung run is killed whole, ranks included, not left behind
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=full_env, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-3000:] + p.stderr[-3000:])
    return p


def record_files(run: Path) -> dict[str, bytes]:
    files = sorted([*run.glob("records/*"), run / "vocab.json", *run.glob("latents/*/*")])
    return {str(p.relative_to(run)): p.read_bytes() for p in files if p.is_file()}


def argv(model: Path, corpus: Path, out: Path, hp: str = HP, **kw: object) -> list[str]:
    return ["record", "--model", str(model), "--corpus", str(corpus), "--out", str(out),
            "--hookpoints", hp, *flags(**{**SMALL, **kw})]


@pytest.fixture(scope="module")
def one_process(tiny_model: Path, corpus_file: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    from neuroscribe import cli

    assert cli.main(argv(tiny_model, corpus_file, out)) == 0
    return out


def test_two_and_three_ranks_write_the_same_records(one_process: Path, tiny_model: Path,
                                                    corpus_file: Path, tmp_path: Path) -> None:
    import json

    want = record_files(one_process)
    assert any(k.startswith("records/") for k in want)
    for n in (2, 3):
        out = tmp_path / f"ranks{n}"
        torchrun(n, argv(tiny_model, corpus_file, out))
        assert record_files(out) == want, f"{n} ranks"
        info = json.loads((out / "record.json").read_text())
        assert info["world_size"] == n
        per_rank = [r["contexts"] for r in info["ranks"]]
        assert len(per_rank) == n and all(c > 0 for c in per_rank)  # the work was split
        assert sum(per_rank) == info["n_contexts"]
        shards = sorted(s for r in info["ranks"] for s in r["shards"])
        assert shards == list(range(len(shards)))


def test_sae_latents_merge_into_delphis_layout(tiny_model: Path, corpus_file: Path,
                                               tmp_path: Path) -> None:
    from test_latents import make_sae

    make_sae(tmp_path / "sae")
    hp = f"{HP}:sae={tmp_path / 'sae'}"
    from neuroscribe import cli

    assert cli.main(argv(tiny_model, corpus_file, tmp_path / "one", hp=hp)) == 0
    torchrun(2, argv(tiny_model, corpus_file, tmp_path / "two", hp=hp))
    want = record_files(tmp_path / "one")
    assert sum(k.startswith("latents/") and k.endswith(".safetensors") for k in want) == 3
    assert record_files(tmp_path / "two") == want
    assert not list((tmp_path / "two" / "latents").glob("*/.rank*"))  # rank folders merged


def test_killed_run_resumes_to_the_same_records(one_process: Path, tiny_model: Path,
                                                corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    # a rank dies after its second shard; torchrun then stops the others
    p = torchrun(2, argv(tiny_model, corpus_file, out, checkpoint_seconds=0),
                 env={"NEUROSCRIBE_DIE_AFTER_SHARDS": "2"}, check=False)
    assert p.returncode != 0
    assert list((out / "record.partial").glob("*.pt")), "no checkpoint was written"
    assert not (out / "records").exists()
    # resume with another number of ranks: the checkpoints' shards are merged, not redone
    from neuroscribe import cli

    assert cli.main([*argv(tiny_model, corpus_file, out, checkpoint_seconds=0), "--resume"]) == 0
    assert record_files(out) == record_files(one_process)
    import json

    info = json.loads((out / "record.json").read_text())
    assert info["resumed_shards"], "the resumed run redid everything"
    assert not (out / "record.partial").exists()


def test_checkpoint_settings_do_not_change_the_records(one_process: Path, tiny_model: Path,
                                                       corpus_file: Path, tmp_path: Path) -> None:
    cfg = RecordConfig(model=str(tiny_model), hookpoints=HP, corpus=str(corpus_file),
                       checkpoint_seconds=0, **SMALL)
    record(cfg, tmp_path / "r")
    assert record_files(tmp_path / "r") == record_files(one_process)
    assert shard_size(cfg) == 32


# ------------------------------------------------------------ the merge, property-tested


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.lists(st.integers(0, 3), min_size=1, max_size=60),
       st.integers(0, 2**31 - 1))
def test_merging_any_split_equals_the_whole(n_ctx: int, owners: list[int], seed: int) -> None:
    """Contexts dealt to up to 4 recorders in any pattern, batched in any size: the merged
    top-k, random and bin samples, histograms and moments equal one recorder on all."""
    u, t = 3, 4
    cfg = RecordConfig(n_top=3, n_random=2, n_quantile=2, quantile_warmup=6, ctx_len=t,
                       n_hist_bins=5, seed=seed % 7)
    rng = np.random.default_rng(seed)
    acts = torch.from_numpy(rng.normal(size=(n_ctx, t, u)).astype(np.float32))
    acts[rng.random(n_ctx) < 0.3] = 0.0  # ties: whole contexts of zeros
    tokens = torch.from_numpy(rng.integers(0, 99, (n_ctx, t)).astype(np.int32))
    whole = UnitRecorder("h", u, cfg)
    whole.update(acts, tokens, torch.arange(n_ctx))
    warm = UnitRecorder("h", u, cfg)  # rank 0: fixes the boundaries on the warm-up
    warm.update(acts[:6], tokens[:6], torch.arange(min(6, n_ctx)))
    warm.fix_boundaries()
    parts = [UnitRecorder("h", u, cfg) for _ in range(4)]
    for p in parts:
        p.set_boundaries(warm.boundaries, warm.hist_edges)
    for c in range(n_ctx):  # context c (its own shard) goes to one recorder, one at a time
        r = parts[owners[c % len(owners)]]
        r.update(acts[c:c + 1], tokens[c:c + 1], torch.tensor([c]), shard=c)
    whole_sharded = UnitRecorder("h", u, cfg)
    whole_sharded.set_boundaries(warm.boundaries, warm.hist_edges)
    for c in range(n_ctx):
        whole_sharded.update(acts[c:c + 1], tokens[c:c + 1], torch.tensor([c]), shard=c)
    got = parts[0].finished(tuple(p.state() for p in parts[1:]))
    want = whole_sharded.finished()
    assert got.keys() == want.keys()
    for k in want:  # exactly (NaN: a unit with zero variance has no skewness)
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True, msg=k)
    # the samples and histogram do not depend on batching either (moments only to rounding)
    ref = whole.finished()
    for k in want:
        if k in ("mean", "variance", "skewness", "kurtosis"):
            torch.testing.assert_close(ref[k], want[k], equal_nan=True)
        elif n_ctx >= 6:
            assert torch.equal(ref[k], want[k]), k


def test_shard_size_is_whole_batches_and_covers_the_warmup() -> None:
    base = RecordConfig(batch_size=8, quantile_warmup=20, shard_contexts=30)
    assert shard_size(base) == 32
    assert shard_size(dataclasses.replace(base, shard_contexts=4)) == 24  # the warm-up rules


def test_keys_order_as_floats_and_break_ties_to_the_lower_context() -> None:
    from neuroscribe.stats import EMPTY, float_keys, with_ctx

    vals = [-math.inf, -2.0, -1.0, -0.5, 0.0, 1e-30, 0.5, 1.0, 2.0, math.inf]
    ctx = torch.arange(len(vals))
    k = float_keys(torch.tensor(vals)[:, None], ctx)[:, 0]
    assert (k[1:] > k[:-1]).all() and (k > EMPTY).all()  # ordered as the floats
    # equal values: the lower context wins; a 32-bit key k32 at context c is k32 * 2^32 + 2^32-1-c
    tie = float_keys(torch.tensor([[3.0], [3.0]]), torch.tensor([7, 5]))[:, 0]
    assert tie[1] > tie[0]
    assert with_ctx(torch.tensor([[2]]), torch.tensor([5])).item() == 2 * 2**32 + 2**32 - 1 - 5


def test_a_killed_sae_run_resumes_from_its_checkpoints_to_the_same_files(
        tiny_model: Path, corpus_file: Path, tmp_path: Path) -> None:
    """SAE latents are checkpointed too: their spill files are cut back to the last
    checkpoint and merged, so the resumed run equals an uninterrupted one, delphi's files
    included (2 ranks killed, resumed in 1 process)."""
    import json

    from test_latents import make_sae

    from neuroscribe import cli

    make_sae(tmp_path / "sae")
    hp = f"{HP}:sae={tmp_path / 'sae'}"
    assert cli.main(argv(tiny_model, corpus_file, tmp_path / "one", hp=hp)) == 0
    out = tmp_path / "killed"
    p = torchrun(2, argv(tiny_model, corpus_file, out, hp=hp, checkpoint_seconds=0),
                 env={"NEUROSCRIBE_DIE_AFTER_SHARDS": "2"}, check=False)
    assert p.returncode != 0 and list((out / "record.partial").glob("*.pt"))
    spills = list((out / "record.partial" / "latents").glob("*/*/*.spill"))
    assert spills and not (out / "latents").exists()
    assert cli.main([*argv(tiny_model, corpus_file, out, hp=hp, checkpoint_seconds=0),
                     "--resume"]) == 0
    assert record_files(out) == record_files(tmp_path / "one")
    info = json.loads((out / "record.json").read_text())
    assert info["resumed_shards"] and not (out / "record.partial").exists()
