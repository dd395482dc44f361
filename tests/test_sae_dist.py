"""SAE training across processes (gloo on CPU) and in bf16: 2 ranks at batch B/2 follow 1 rank
at batch B; resume under 2 ranks; one SAE per hookpoint per rank; bf16 keeps fp32 state."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from neuroscribe.sae.acts import tensor_batches
from neuroscribe.sae.dist import Comm
from neuroscribe.sae.launch import assign, hookpoint_folder
from neuroscribe.sae.model import fvu
from neuroscribe.sae.train import TrainSaeConfig, load_checkpoint, train_sae

ROOT = Path(__file__).resolve().parents[1]
D, B = 16, 256  # input width, global batch
ARCHS: dict[str, dict[str, Any]] = {
    "topk": {"k": 4, "auxk_alpha": 0.5},  # dead latents appear: AuxK runs on reduced stats
    "batchtopk": {"k": 4},
    "relu": {"resample_every": 8, "l1_coeff": 0.3},
    "jumprelu": {"l0_coeff": 0.001},
}


def data(n: int = 4096, seed: int = 0) -> Any:
    """Sparse codes over a random dictionary, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(48, D, generator=g)
    codes = (torch.rand(n, 48, generator=g) < 0.08) * torch.rand(n, 48, generator=g)
    return codes @ dictionary + 0.05 * torch.randn(n, D, generator=g)


def config(arch: str, **kw: Any) -> TrainSaeConfig:
    return TrainSaeConfig(architecture=arch, n_latents=64, batch_size=B, lr=1e-2,
                          dead_tokens=1024, checkpoint_every=10, log_every=5,
                          **{**ARCHS[arch], **kw})


def _train(arch: str, out: Path | None, steps: int, start: int = 0, comm: Comm | None = None,
           **kw: Any) -> tuple[Any, dict[str, Any]]:
    batches = tensor_batches(data(), B, seed=1, start_step=start, epochs=2)
    limited = (b for _, b in zip(range(steps - start), batches))
    return train_sae(config(arch, **kw), limited, d_in=D, out=out, resume=start > 0,
                     comm=comm)


def _worker(rank: int, world: int, port: int, task: str, folder: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a collective that one rank skips fails after a minute instead of hanging the test
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    comm, root = Comm.current(), Path(folder)
    result: dict[str, Any] = {}
    if task == "equivalence":
        for arch in ARCHS:
            sae, m = _train(arch, root / arch, steps=30, comm=comm)
            result[arch] = {"sae": sae.state_dict(), "history": m["history"]}
    else:  # checkpoint at step 20 under 2 ranks, then resume under 2 ranks
        _train("topk", root / "resumed", steps=20, comm=comm)
        dist.barrier()
        sae, _ = _train("topk", root / "resumed", steps=30, start=20, comm=comm)
        result["sae"] = sae.state_dict()
    torch.save(result, root / f"rank{rank}.pt")
    dist.destroy_process_group()


def spawn(task: str, folder: Path, world: int = 2) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, task, str(folder)), nprocs=world, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _close(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


def test_two_ranks_at_half_batch_follow_one_rank_step_for_step(tmp_path: Path) -> None:
    ranks = spawn("equivalence", tmp_path / "ddp")
    for arch in ARCHS:
        one, m = _train(arch, tmp_path / "one" / arch, steps=30)
        for r in ranks:  # both ranks hold the 1-rank parameters (and so each other's)
            _close(r[arch]["sae"], one.state_dict())
        assert all(torch.equal(ranks[0][arch]["sae"][k], ranks[1][arch]["sae"][k])
                   for k in one.state_dict())
        # the logged metrics are the global batch's, not one rank's
        for h2, h1 in zip(ranks[0][arch]["history"], m["history"], strict=True):
            assert h2.keys() == h1.keys() and h2["tokens"] == h1["tokens"]
            for k in h1:
                assert h2[k] == pytest.approx(h1[k], rel=1e-3, abs=1e-5), (arch, k)
        # dead-latent statistics: reduced over ranks, identical to the 1-rank run's
        ck1 = load_checkpoint(tmp_path / "one" / arch)["state"]
        ck2 = load_checkpoint(tmp_path / "ddp" / arch)["state"]
        assert torch.equal(ck1["since_fired"], ck2["since_fired"]), arch
        assert torch.equal(ck1["window_fired"], ck2["window_fired"]), arch
    dead = load_checkpoint(tmp_path / "one" / "topk")["state"]["since_fired"] >= 1024
    assert dead.any() and not dead.all()  # so AuxK did run on the reduced statistics


def test_checkpoint_and_resume_under_two_ranks(tmp_path: Path) -> None:
    (rank0, rank1) = spawn("resume", tmp_path)
    straight, _ = _train("topk", tmp_path / "straight", steps=30)
    _close(rank0["sae"], straight.state_dict())
    assert all(torch.equal(rank0["sae"][k], rank1["sae"][k]) for k in rank0["sae"])
    assert load_checkpoint(tmp_path / "resumed")["state"]["step"] == 30
    assert (tmp_path / "resumed" / "sae.safetensors").exists()


def test_hookpoints_go_to_ranks_round_robin() -> None:
    hps = [f"h.{i}" for i in range(5)]
    assert assign(hps, Comm(0, 2)) == ["h.0", "h.2", "h.4"]
    assert assign(hps, Comm(1, 2)) == ["h.1", "h.3"]
    assert assign(hps, Comm(0, 1)) == hps
    assert hookpoint_folder("a.b:input") == "a.b-input"


def _torchrun(args: list[str], world: int = 2) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", "-m", "neuroscribe", "train-sae", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_trains_one_sae_per_hookpoint_and_one_sae_data_parallel(
        tiny_model: Path, corpus_file: Path, tmp_path: Path) -> None:
    common = ["--model", str(tiny_model), "--corpus", str(corpus_file), "--max-tokens", "2048",
              "--ctx-len", "16", "--eval-tokens", "256", "--shuffle-tokens", "1024",
              "--n-latents", "64", "--k", "4", "--batch-size", "128"]
    hps = ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    proc = _torchrun([*common, "--hookpoint", ",".join(hps), "--distribute-hookpoints",
                      "--out", str(tmp_path / "multi")])
    index = json.loads((tmp_path / "multi" / "hookpoints.json").read_text())
    assert {h: v["rank"] for h, v in index.items()} == {hps[0]: 0, hps[1]: 1}
    for hp in hps:
        cfg = json.loads((tmp_path / "multi" / hp / "cfg.json").read_text())
        assert cfg["hookpoint"] == hp
        assert "spliced" in json.loads((tmp_path / "multi" / hp / "metrics.json").read_text())
    assert proc.stdout.count("trained ") == 2  # each rank reports its own SAE
    proc = _torchrun([*common, "--hookpoint", hps[1], "--store", str(tmp_path / "store"),
                      "--out", str(tmp_path / "ddp")])
    assert proc.stdout.count("trained ") == 1  # rank 0 alone reports, writes and evaluates
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["tokens"] == m["steps"] * 256 and 0 < m["held_out"]["fvu"] < 1
    assert (tmp_path / "store" / "store.json").exists()


def test_bf16_keeps_fp32_master_weights_and_adam_state_and_matches_fp32(tmp_path: Path) -> None:
    held = data(2048, seed=5)
    fvus = {}
    for dtype in ("float32", "bfloat16"):
        sae, _ = _train("topk", tmp_path / dtype, steps=60, dtype=dtype)
        fvus[dtype] = fvu(held, sae(held))
        ck = load_checkpoint(tmp_path / dtype)
        assert {v.dtype for v in ck["sae"].values()} == {torch.float32}
        states = ck["optim"]["state"].values()
        assert {t.dtype for s in states for t in s.values() if t.dim()} == {torch.float32}
    assert fvus["float32"] < 0.5
    assert abs(fvus["bfloat16"] - fvus["float32"]) < 0.02, fvus
