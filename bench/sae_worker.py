"""Child process of ``bench/sae.py``: trains one library's TopK SAE, or writes format fixtures.

It runs in that library's own virtual environment (neuroscribe: the calling interpreter), so it
imports nothing from neuroscribe unless it is training neuroscribe, and needs only torch and
safetensors besides the library under test.

    python bench/sae_worker.py train LIB SPEC.json OUT.json      # LIB: neuroscribe,
                                   # neuroscribe-bf16, sparsify, sparsify-fused, saelens,
                                   # sparsify-signum
    python bench/sae_worker.py fixtures LIB FOLDER               # LIB: sparsify, saelens

``train`` loads the activations file named in SPEC (safetensors with ``train`` [N, d_in] and
``heldout`` [M, d_in], float32), trains on the deterministic batch sequence
``train[(i % (N // B)) * B : ...]`` for ``warmup_steps + steps`` steps, times the last ``steps``
of them, then measures FVU on ``heldout`` with the library's own encode/decode. The result goes
to OUT.json (libraries print to stdout; the file keeps the result clean).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

Batches = Callable[[], Iterator[torch.Tensor]]

WHAT_IS_TIMED = {
    "neuroscribe": (
        "neuroscribe.sae.train.train_sae(cfg, batches, d_in, out=None) as shipped: its whole "
        "loop (forward, loss incl. AuxK when latents are dead, backward, decoder-norm handling, "
        "optimizer). Clock starts when the trainer asks for batch warmup_steps, stops when "
        "train_sae returns."
    ),
    "sparsify": (
        "sparsify.SparseCoder forward (fused TopK encoder with index_add sparse backward, "
        "embedding_bag decoder) + FVU loss backward, driven by a loop that repeats what "
        "sparsify.Trainer does per step for loss_fn='fvu' (its Trainer needs a HF model): "
        "b_dec = first batch mean, set_decoder_norm_to_unit_norm() every step, loss = fvu + "
        "auxk_alpha*auxk + multi_topk_fvu/8, did_fire bookkeeping, "
        "remove_gradient_parallel_to_decoder_directions(), torch.optim.Adam step at a constant "
        "lr (the Trainer's adam path without bitsandbytes; schedule replaced by constant lr)."
    ),
    "neuroscribe-bf16": (
        "As 'neuroscribe' with dtype='bfloat16': the encoder matmul in bf16 (bf16 copies of "
        "W_enc and the centred inputs each step), fp32 master weights, fp32 fused Adam state."
    ),
    "sparsify-fused": (
        "As 'sparsify' with only torch.optim.Adam(fused=True) changed (neuroscribe's optimizer "
        "setting), to separate the loop's own lead from the fused optimizer's."
    ),
    "sparsify-signum": (
        "As 'sparsify' but with sparsify's default optimizer: ScheduleFreeWrapper(SignSGD, "
        "momentum=0.95) at sparsify's default lr 5e-3 / sqrt(n_latents / 2**14) (the lr flag is "
        "ignored); FVU measured in the optimizer's eval mode (its averaged weights)."
    ),
    "saelens": (
        "sae_lens.SAETrainer.fit() unchanged, on TopKTrainingSAE (library defaults: "
        "rescale_acts_by_decoder_norm=True, decoder_init_norm=0.1, aux_loss_coefficient=1, "
        "dense activations) with a data provider yielding the shared batches; its step is "
        "training_forward_pass (MSE summed over d_in, mean over tokens, + TopK aux loss), "
        "firing statistics, clip_grad_norm_(1.0), Adam, constant lr scheduler. Clock starts "
        "when fit() asks for batch warmup_steps, stops when fit() returns."
    ),
}


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


# ---- data ------------------------------------------------------------------------------------


def load_acts(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    t = load_file(path)
    return t["train"].float().contiguous(), t["heldout"].float().contiguous()


class Clock:
    """Batches in a fixed order; notes when each is asked for, so that the time between two
    requests is one step of the trainer's loop, whatever the loop does."""

    def __init__(self, train: torch.Tensor, batch_size: int, total: int, start: int) -> None:
        n_batches = train.shape[0] // batch_size
        if n_batches < 1:
            raise SystemExit(f"{train.shape[0]} training tokens < one batch of {batch_size}")
        self.batches = [train[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
        self.total, self.start = total, start
        self.times: list[float] = []

    def __call__(self) -> Iterator[torch.Tensor]:
        for i in range(self.total):
            self.times.append(time.perf_counter())
            yield self.batches[i % len(self.batches)]

    def stop(self) -> float:
        """Call when training returns: seconds from the first timed step to now."""
        self.times.append(time.perf_counter())
        if len(self.times) != self.total + 1:
            raise SystemExit(f"the trainer took {len(self.times) - 1} of {self.total} batches")
        return self.times[-1] - self.times[self.start]

    def step_seconds(self) -> list[float]:
        t = self.times[self.start:]
        return [b - a for a, b in zip(t, t[1:])]


@torch.no_grad()
def fvu(reconstruct: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
        chunk: int = 4096) -> float:
    """sum |x - x_hat|^2 / sum |x - mean(x)|^2 over all of x, accumulated in float64."""
    num = 0.0
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        num += float((xb - reconstruct(xb)).double().pow(2).sum())
    den = float((x.double() - x.double().mean(0)).pow(2).sum())
    return num / den


# ---- trainers: each returns (seconds of the timed steps, reconstruct function, extra info) ---


def train_neuroscribe(spec: dict[str, Any], clock: Clock,
                      dtype: str = "float32") -> tuple[float, Any, dict[str, Any]]:
    import dataclasses

    from neuroscribe.sae.train import TrainSaeConfig, train_sae

    names = {f.name for f in dataclasses.fields(TrainSaeConfig)}
    want = {"architecture": "topk", "n_latents": spec["n_latents"], "k": spec["k"],
            "batch_size": spec["batch_size"], "lr": spec["lr"], "seed": spec["seed"]}
    # step/token budget field names as the trainer spells them (if it has one)
    total = spec["warmup_steps"] + spec["steps"]
    for name, value in (("steps", total), ("max_steps", total), ("n_steps", total),
                        ("max_tokens", total * spec["batch_size"]),
                        ("n_tokens", total * spec["batch_size"]),
                        ("threads", spec["threads"]), ("dtype", dtype)):
        if name in names:
            want[name] = value
    cfg = TrainSaeConfig(**{k: v for k, v in want.items() if k in names})
    sae, metrics = train_sae(cfg, clock(), d_in=clock.batches[0].shape[1], out=None)
    seconds = clock.stop()
    sae.eval()
    return seconds, lambda x: sae.decode(sae.encode(x)), {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                   if isinstance(v, (int, float, str, bool)) or v is None},
        "train_metrics": {k: v for k, v in (metrics or {}).items()
                          if isinstance(v, (int, float, str, bool))},
    }


def train_sparsify(spec: dict[str, Any], clock: Clock, signum: bool = False,
                   fused: bool = False) -> tuple[float, Any, dict[str, Any]]:
    from sparsify import SaeConfig, SparseCoder

    n, k, B = spec["n_latents"], spec["k"], spec["batch_size"]
    torch.manual_seed(spec["seed"])
    sae_cfg = SaeConfig(num_latents=n, k=k)  # activation topk, normalize_decoder, no skip
    sae = SparseCoder(clock.batches[0].shape[1], sae_cfg, "cpu", dtype=torch.float32)
    auxk_alpha = 0.0  # TrainConfig default
    if signum:
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        lr = 5e-3 / (n / 2**14) ** 0.5
        opt: Any = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]),
                                       momentum=0.95)
        opt.train()
    else:
        lr = spec["lr"]
        opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=fused)
    did_fire = torch.zeros(n, dtype=torch.bool)
    since_fired = torch.zeros(n, dtype=torch.long)
    dead_threshold = 10_000_000  # TrainConfig.dead_feature_threshold

    fvus = []
    for step, x in enumerate(clock()):
        if step == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > dead_threshold if auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        fvus.append(float(out.fvu.detach()))
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired += B
            since_fired[did_fire] = 0
            did_fire.zero_()
    seconds = clock.stop()
    if signum:
        opt.eval()
    sae.eval()

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae(x).sae_out

    return seconds, reconstruct, {
        "config": {**sae_cfg.to_dict(), "optimizer": "signum (schedule-free)" if signum
                   else f"torch.optim.Adam(fused={fused})", "lr": lr, "auxk_alpha": auxk_alpha},
        "train_metrics": {"last_batch_fvu": fvus[-1]},
    }


def train_saelens(spec: dict[str, Any], clock: Clock) -> tuple[float, Any, dict[str, Any]]:
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(spec["seed"])
    sae_cfg = TopKTrainingSAEConfig(d_in=clock.batches[0].shape[1], d_sae=spec["n_latents"],
                                    k=spec["k"], dtype="float32", device="cpu")
    sae = TopKTrainingSAE(sae_cfg)
    B = spec["batch_size"]
    tcfg = SAETrainerConfig(total_training_samples=clock.total * B, train_batch_size_samples=B,
                            lr=spec["lr"], lr_end=spec["lr"] / 10,
                            lr_scheduler_name="constant", lr_warm_up_steps=0, device="cpu")
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=clock())
    trainer.fit()
    seconds = clock.stop()
    sae.eval()
    return seconds, sae.forward, {
        "config": {k: v for k, v in sae_cfg.to_dict().items() if k != "metadata"},
        "trainer_config": {k: v for k, v in vars(tcfg).items() if k != "logger"},
        "train_metrics": {"dead_latents": int(trainer.dead_neurons.sum())},
    }


TRAINERS: dict[str, Callable[..., tuple[float, Any, dict[str, Any]]]] = {
    "neuroscribe": train_neuroscribe,
    "neuroscribe-bf16": lambda spec, clock: train_neuroscribe(spec, clock, dtype="bfloat16"),
    "sparsify": train_sparsify,
    "sparsify-fused": lambda spec, clock: train_sparsify(spec, clock, fused=True),
    "sparsify-signum": lambda spec, clock: train_sparsify(spec, clock, signum=True),
    "saelens": train_saelens,
}
DISTS = {"neuroscribe": "neuroscribe", "neuroscribe-bf16": "neuroscribe",
         "sparsify": "eai-sparsify", "sparsify-fused": "eai-sparsify",
         "sparsify-signum": "eai-sparsify", "saelens": "sae-lens"}


def keep_freed_memory() -> None:
    """neuroscribe/sae/memory.py's setting (which train-sae makes), for every library alike:
    that file is loaded by its path, since the other libraries' venvs have no neuroscribe."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "neuroscribe" / "sae" / "memory.py"
    spec = importlib.util.spec_from_file_location("neuroscribe_sae_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not module.keep_freed_memory():
        raise SystemExit("keep_freed_memory: not glibc here; rerun with --default-malloc")


def run_train(lib: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("keep_freed_memory"):
        keep_freed_memory()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    train, heldout = load_acts(spec["acts"])
    total = spec["warmup_steps"] + spec["steps"]
    clock = Clock(train, spec["batch_size"], total, spec["warmup_steps"])
    seconds, reconstruct, info = TRAINERS[lib](spec, clock)
    tokens = spec["steps"] * spec["batch_size"]
    steps = sorted(clock.step_seconds())
    median_step = steps[len(steps) // 2]
    result = {
        "library": lib,
        "version": version(DISTS[lib]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "steps_trained": total,
        "steps_timed": spec["steps"],
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "median_step_seconds": round(median_step, 5),
        "tokens_per_s_median_step": round(spec["batch_size"] / median_step, 1),
        "step_seconds": [round(x, 5) for x in clock.step_seconds()],
        "heldout_fvu": round(fvu(reconstruct, heldout), 5),
        "what_is_timed": WHAT_IS_TIMED[lib],
        **info,
    }
    Path(out_path).write_text(json.dumps(result, indent=1, default=str))


# ---- fixtures: tiny random SAEs in each library's own format ----------------------------------


def fixture_inputs(d_in: int = 8) -> torch.Tensor:
    return torch.randn(3, d_in, generator=torch.Generator().manual_seed(1234))


def write_expected(folder: Path, x: torch.Tensor, latents: torch.Tensor,
                   recon: torch.Tensor, how: dict[str, Any]) -> None:
    doc = {**how, "inputs": x.tolist(), "latents": latents.tolist(),
           "reconstructions": recon.tolist()}
    (folder / "expected.json").write_text(json.dumps(doc, indent=1) + "\n")


@torch.no_grad()
def fixtures_sparsify(root: Path) -> None:
    from sparsify import SaeConfig, SparseCoder

    torch.manual_seed(0)
    sae = SparseCoder(8, SaeConfig(num_latents=16, k=4), "cpu", dtype=torch.float32)
    sae.encoder.bias.copy_(torch.randn(16) * 0.2)  # non-zero so that loaders must use them
    sae.b_dec.copy_(torch.randn(8) * 0.2)
    folder = root / "sparsify_topk"
    sae.save_to_disk(folder)
    loaded = SparseCoder.load_from_disk(folder)
    x = fixture_inputs()
    enc = loaded.encode(x)
    dense = torch.zeros(3, 16).scatter_(1, enc.top_indices, enc.top_acts)
    recon = loaded.decode(enc.top_acts, enc.top_indices)
    write_expected(folder, x, dense, recon, {
        "library": f"eai-sparsify {version('eai-sparsify')}",
        "written_by": "SparseCoder(8, SaeConfig(num_latents=16, k=4)).save_to_disk(folder)",
        "computed_by": "SparseCoder.load_from_disk(folder): encode(x) -> (top_acts, "
                       "top_indices) scattered into 16 dense latents; decode(top_acts, "
                       "top_indices)",
    })


@torch.no_grad()
def fixtures_saelens(root: Path) -> None:
    from sae_lens import (
        SAE,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    torch.manual_seed(0)
    made = {
        "saelens_standard": StandardTrainingSAE(StandardTrainingSAEConfig(d_in=8, d_sae=16)),
        "saelens_jumprelu": JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=8, d_sae=16)),
        "saelens_topk": TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=16, k=4)),
    }
    for name, sae in made.items():
        # random weights everywhere (the init leaves biases at zero and decoder rows at 0.1
        # norm), so that a loader which drops a bias or a norm gets different numbers
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn_like(p) * 0.5)
        sae.b_enc.copy_(torch.randn_like(sae.b_enc) * 0.2)
        sae.b_dec.copy_(torch.randn_like(sae.b_dec) * 0.2)
        if name == "saelens_jumprelu":
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.5)
        folder = root / name
        sae.save_inference_model(folder)
        loaded = SAE.load_from_disk(str(folder))
        x = fixture_inputs()
        latents = loaded.encode(x)
        recon = loaded.decode(latents)
        write_expected(folder, x, latents, recon, {
            "library": f"sae-lens {version('sae-lens')}",
            "written_by": f"{type(sae).__name__}({type(sae.cfg).__name__}(d_in=8, d_sae=16"
                          f"{', k=4' if 'topk' in name else ''})).save_inference_model(folder)"
                          " after setting every parameter to random values",
            "computed_by": f"SAE.load_from_disk(folder) -> {type(loaded).__name__}: "
                           "latents = encode(x), reconstructions = decode(latents)",
        })
    # An inference TopKSAE whose decoder rows are not unit norm and whose cfg says
    # rescale_acts_by_decoder_norm (as SAETrainer checkpoints and hub uploads can be).
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=4, rescale_acts_by_decoder_norm=True))
    for p in (sae.W_enc, sae.W_dec):
        p.copy_(torch.randn_like(p) * 0.5)
    sae.b_enc.copy_(torch.randn_like(sae.b_enc) * 0.2)
    sae.b_dec.copy_(torch.randn_like(sae.b_dec) * 0.2)
    folder = root / "saelens_topk_rescaled"
    sae.save_model(folder)
    loaded = SAE.load_from_disk(str(folder))
    x = fixture_inputs()
    latents = loaded.encode(x)
    write_expected(folder, x, latents, loaded.decode(latents), {
        "library": f"sae-lens {version('sae-lens')}",
        "written_by": "TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=4, "
                      "rescale_acts_by_decoder_norm=True)).save_model(folder) after setting "
                      "every parameter to random values (decoder rows not unit norm)",
        "computed_by": "SAE.load_from_disk(folder) -> TopKSAE: latents = encode(x), "
                       "reconstructions = decode(latents)",
    })


def run_fixtures(lib: str, folder: str) -> None:
    torch.set_num_threads(1)
    {"sparsify": fixtures_sparsify, "saelens": fixtures_saelens}[lib](Path(folder))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "train":
        run_train(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "fixtures":
        run_fixtures(*sys.argv[2:])
    else:
        raise SystemExit(__doc__)
