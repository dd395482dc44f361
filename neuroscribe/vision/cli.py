"""``neuroscribe vision``: the activation verbalizer and the per-channel descriptions of a CNN.

``vision report --out RUN`` trains (or reuses) the small CNN, trains the verbalizer on its
first-layer maps and on the two controls, describes and scores every channel of the layer in
a run folder of the text units' formats (``RUN/channels``: records, explanations, scores,
``index.sqlite``, the records' images), and writes the table and the figures.
``vision verbalize IMAGE`` prints the sentence for an image (or every image of a folder).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroscribe.runs import opt

if TYPE_CHECKING:
    import numpy as np


@dataclass
class ChannelConfig:
    """Which images the channels' records hold and how their descriptions are scored."""

    n_stimuli: int = opt(150, "held-out random gratings, edges and spots, each (not the tuning "
                         "grid)")
    n_primitives: int = opt(200, "procedural primitives (test split) in the records' pool")
    n_digits: int = opt(200, "scikit-learn digits (test split) in the records' pool")
    n_top: int = opt(40, "top-activating images per channel (train/calibration/valid/test)")
    n_random: int = opt(30, "random images per channel (calibration/valid/test)")
    grid: int = opt(16, "each response map is average-pooled to GRID x GRID record tokens")
    stim_seed: int = opt(1, "seed of the held-out stimuli and the random records")


def pooled_maps(model: Any, layer: str, images: np.ndarray, grid: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from neuroscribe.vision.cnn import activations

    a = torch.from_numpy(activations(model, layer, images))
    return F.adaptive_avg_pool2d(a, min(grid, a.shape[-1])).numpy()  # [N, C, g, g]


def record_channels(model: Any, model_name: str, layer: str, cfg: ChannelConfig, run_dir: Path,
                    images: np.ndarray, sources: list[str], maps: np.ndarray) -> None:
    """``records/<layer>.safetensors`` (the text units' store: one record per image, one token
    per pooled map cell), ``vocab.json``, ``record.json``, and the records' images under
    ``images/<layer>/<unit>/{top,random,q0..q3}_<i>.png``."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file

    from neuroscribe.models import safe_name
    from neuroscribe.record.core import RecordConfig, UnitRecorder, store_path
    from neuroscribe.runs import atomic_path, save_stage, write_json
    from neuroscribe.vision.channels import heat_overlay, save_png

    n, c, g, _ = maps.shape
    rc = RecordConfig(model=model_name, hookpoints=layer, corpus="vision:stimuli+primitives+"
                      "digits", max_tokens=n * g * g, ctx_len=g * g, batch_size=64,
                      n_top=cfg.n_top, n_random=cfg.n_random, quantile_warmup=min(256, n),
                      seed=cfg.stim_seed)
    rec = UnitRecorder(layer, c, rc)
    flat = torch.from_numpy(np.ascontiguousarray(maps.reshape(n, c, g * g).transpose(0, 2, 1)))
    with torch.inference_mode():
        for i in range(0, n, 64):
            acts = flat[i:i + 64]
            toks = torch.arange(g * g, dtype=torch.int32).repeat(len(acts), 1)
            rec.update(acts, toks, torch.arange(i, i + len(acts)))
        with atomic_path(store_path(run_dir, layer)) as tmp:
            rec.save(tmp, {"hookpoint": layer, "layer_index": "0", "ctx_len": str(g * g)})
    write_json(run_dir / "vocab.json", [f"r{r}c{k}" for r in range(g) for k in range(g)])
    t = load_file(str(store_path(run_dir, layer)))
    for unit in range(c):
        folder = run_dir / "images" / safe_name(layer) / str(unit)
        peak = max(float(maps[:, unit].max()), 1e-9)
        for prefix in ("top", "random", "q0", "q1", "q2", "q3"):
            for i, ctx in enumerate(int(x) for x in t[f"{prefix}_ctx"][unit] if x >= 0):
                save_png(folder / f"{prefix}_{i}.png", images[ctx])
                if prefix == "top":
                    save_png(folder / f"{prefix}_{i}_heat.png",
                             heat_overlay(images[ctx], maps[ctx, unit] / peak))
    save_stage(run_dir, "record", rc, complete=True, hookpoints=[layer], units={layer: c},
               n_contexts=n, n_tokens=n * g * g, modality="vision", grid=[g, g],
               image_size=list(images.shape[2:]), sources=dict(Counter(sources)),
               image_names="images/<hookpoint>/<unit>/<top|random|q0..q3>_<i>.png: the i-th "
               "record of that list in the NeuronRecord (top_<i>_heat.png: its map over it); "
               "token rRcK is pooled map cell (R, K)")


def _corr(pred: np.ndarray, real: np.ndarray) -> float | None:
    """Pearson correlation; 0 when the prediction is constant but the real responses vary (a
    sentence that predicts nothing), None when the real responses are constant."""
    import numpy as np

    from neuroscribe.score.core import correlation_score

    if len(real) == 0 or float(np.std(real)) == 0:
        return None
    r = correlation_score(real.ravel(), pred.ravel())
    return 0.0 if math.isnan(r) else round(r, 6)


def explain_and_score(tunings: list[dict[str, Any]], layer: str, cfg: ChannelConfig,
                      run_dir: Path, images: np.ndarray, sources: list[str],
                      maps: np.ndarray) -> dict[str, Any]:
    """Write one explanation per channel (from its tuning) and score it exactly as text units
    are scored: calibration on the calibration split, then valid and test, top/random/all."""
    import numpy as np
    from safetensors.numpy import load_file

    from neuroscribe.explain.core import explanation_path
    from neuroscribe.formats import (
        SPLITS_RANDOM,
        SPLITS_TOP,
        NeuronSimulationResults,
        ScoredExplanation,
        dumps,
        interleaved_slices,
    )
    from neuroscribe.pipeline import score_path
    from neuroscribe.record.core import RecordStore, store_path
    from neuroscribe.results import index_run, summarize
    from neuroscribe.runs import atomic_write_text, save_stage, write_json
    from neuroscribe.score.core import LinearCalibration, flatten, score_records
    from neuroscribe.simulate.core import point_simulation
    from neuroscribe.vision.channels import describe, simulate_maps

    store = RecordStore(run_dir)
    t = load_file(str(store_path(run_dir, layer)))
    src = np.array(sources)
    g = maps.shape[-1]
    save_stage(run_dir, "explain", cfg, complete=False)
    save_stage(run_dir, "score", cfg, complete=False)
    for unit, tuning in enumerate(tunings):
        text = describe(tuning)
        write_json(explanation_path(run_dir, layer, unit),
                   {"hookpoint": layer, "unit": unit, "explainer": "vision-tuning",
                    "explanation": text, "candidates": [text], "tuning": tuning})
        pred = simulate_maps(text, images, g)
        nr = store.neuron_record(layer, unit)
        sims = {p: [point_simulation(store.vocab, pred[int(x)].ravel())
                    for x in t[f"{p}_ctx"][unit] if x >= 0] for p in ("top", "random")}
        recs = {"top": nr.most_positive_activation_records, "random": nr.random_sample}

        def part(kind: str, split: str, recs: dict = recs, sims: dict = sims) -> tuple:
            names = SPLITS_TOP if kind == "top" else SPLITS_RANDOM
            if split not in names:
                return [], []
            sl = interleaved_slices(names, len(recs[kind]) // len(names))[split]
            return recs[kind][sl], sims[kind][sl]

        cal_r, cal_s = (a + b for a, b in zip(part("top", "calibration"),
                                              part("random", "calibration")))
        calib = LinearCalibration.fit(flatten([s.expected_activations for s in cal_s]),
                                      flatten([r.activations for r in cal_r]))
        scores, valid = {}, None
        for split in ("valid", "test"):
            (tr, ts), (rr, rs) = part("top", split), part("random", split)
            for variant, (r, s) in {"all": (tr + rr, ts + rs), "top": (tr, ts),
                                    "random": (rr, rs)}.items():
                sc = score_records(r, s, calib)
                scores[f"{split}_{variant}"] = {k: _clean(getattr(sc, k)) for k in (
                    "ev_correlation_score", "rsquared_score", "absolute_dev_explained_score")}
                valid = sc if (split, variant) == ("valid", "all") else valid
        per_source = {s: _corr(pred[src == s], maps[src == s, unit]) for s in sorted(set(sources))}
        write_json(score_path(run_dir, layer, unit, "scores"), {
            "hookpoint": layer, "unit": unit, "simulator": "vision-filter", "explanation": text,
            "candidates": [{"explanation": text, "calibration_ev_correlation": _corr(
                np.array(flatten([s.expected_activations for s in cal_s])),
                np.array(flatten([r.activations for r in cal_r])))}],
            "calibration": {"slope": calib.slope, "intercept": calib.intercept},
            "scores": scores, "vision": {"correlation_by_source": per_source}})
        atomic_write_text(score_path(run_dir, layer, unit), dumps(NeuronSimulationResults(
            neuron_id=nr.neuron_id, scored_explanations=[ScoredExplanation(text, valid)])))
    save_stage(run_dir, "explain", cfg, complete=True, explained=len(tunings), failed=0)
    save_stage(run_dir, "score", cfg, complete=True, scored=len(tunings), failed=0)
    index_run(run_dir)
    return summarize(run_dir)


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


@dataclass
class VisionConfig:
    """Which CNN layer the channel half describes, and where the verbalize command looks."""

    model: str = opt("small", "CNN whose channels are described: 'small' (trained here, with "
                     "its untrained twin as control), package.module:attribute (an nn.Module "
                     "or a callable returning one) or a .pt file holding a pickled module")
    layer: str = opt("conv1", "module path of the conv layer whose channels are described")
    threads: int = opt(0, "torch CPU threads (0: torch's default, every core)")


def _channel_half(model: Any, name: str, layer: str, cfg: ChannelConfig,
                  run_dir: Path) -> dict[str, Any]:
    from neuroscribe.vision.channels import filter_grid, image_pool, measure_tuning
    from neuroscribe.vision.cnn import conv_layer, conv_layers

    conv = conv_layer(model, layer)
    first = conv_layers(model)[0]
    in_ch = conv_layer(model, first).in_channels
    images, sources = image_pool(cfg.n_stimuli, cfg.n_primitives, cfg.n_digits, cfg.stim_seed)
    if in_ch == 1:
        images = images.mean(axis=1, keepdims=True)
    maps = pooled_maps(model, layer, images, cfg.grid)
    record_channels(model, name, layer, cfg, run_dir, images, sources, maps)
    tunings = measure_tuning(model, layer, in_ch)
    summary = explain_and_score(tunings, layer, cfg, run_dir, images, sources, maps)
    units = _unit_scores(run_dir, layer, len(tunings))
    if layer == first:
        filter_grid(conv.weight.detach().numpy(), [u["explanation"] for u in units],
                    [u["valid_all"] for u in units], run_dir / "filters.png")
    return {"summary": summary["distribution"], "units": units}


def _unit_scores(run_dir: Path, layer: str, n: int) -> list[dict[str, Any]]:
    import json

    from neuroscribe.pipeline import score_path

    out = []
    for u in range(n):
        s = json.loads(score_path(run_dir, layer, u, "scores").read_text())
        out.append({"unit": u, "explanation": s["explanation"],
                    "valid_all": s["scores"]["valid_all"]["ev_correlation_score"],
                    **s["vision"]["correlation_by_source"]})
    return out


def _median(values: list[float | None]) -> float | None:
    import numpy as np

    v = [x for x in values if x is not None]
    return round(float(np.median(v)), 4) if v else None


def report(vc: VisionConfig, cnn_cfg: Any, verb_cfg: Any, ch_cfg: ChannelConfig,
           out: Path, resume: bool = False) -> dict[str, Any]:
    import json
    import time

    import numpy as np
    import torch

    from neuroscribe.runs import claim_stage, save_stage, write_json
    from neuroscribe.vision.cnn import activations, conv_layer, load_user_cnn, small_cnn, train_cnn
    from neuroscribe.vision.verbalize import (
        evaluate_features,
        examples_figure,
        predict,
        verbalizer_data,
    )

    if vc.threads > 0:
        torch.set_num_threads(vc.threads)
    t0 = time.perf_counter()
    user = None if vc.model == "small" else load_user_cnn(vc.model)
    conv_layer(user or small_cnn(cnn_cfg.width), vc.layer)  # a bad layer fails before training
    if claim_stage(out, "vision", vc, resume) and (out / "report.json").exists():
        return json.loads((out / "report.json").read_text())  # finished: --resume reuses it
    save_stage(out, "vision", vc, complete=False)
    trained, cnn_meta = train_cnn(cnn_cfg, out / "cnn")
    untrained = small_cnn(cnn_cfg.width, cnn_cfg.seed).eval()
    data = verbalizer_data(verb_cfg, cnn_cfg.seed)
    features = {"trained CNN": lambda x: activations(trained, "conv1", x),
                "untrained CNN": lambda x: activations(untrained, "conv1", x),
                "raw pixels": lambda x: x}
    verb = {}
    for name, f in features.items():
        model, verb[name] = evaluate_features(name.split()[0], f, data, verb_cfg,
                                              out / "verbalizer", cnn_cfg.seed,
                                              cnn_meta["config"] if "CNN" in name else None)
        if name == "trained CNN":  # 4 in-distribution, 8 held-out, 4 digits
            x = np.concatenate([data[k][0][:n] for k, n in (("test", 4), ("heldout", 8),
                                                            ("digits", 4))])
            t = data["test"][1][:4] + data["heldout"][1][:8] + data["digits"][1][:4]
            examples_figure(x, t, predict(model, f(x)), out / "verbalizer_examples.png")
    subjects = ({"trained CNN": trained, "untrained CNN": untrained} if user is None
                else {vc.model: user})
    channels = {name: _channel_half(m, name, vc.layer, ch_cfg,
                                    out / ("channels" if i == 0 else "channels-untrained"))
                for i, (name, m) in enumerate(subjects.items())}
    res = {"cnn": cnn_meta, "verbalizer": verb, "channels": channels,
           "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "report.json", res)
    text = format_report(res)
    (out / "report.md").write_text(text + "\n")
    save_stage(out, "vision", vc, complete=True, seconds=res["seconds"],
               configs={c.__class__.__name__: asdict(c) for c in (cnn_cfg, verb_cfg, ch_cfg)})
    return res


def format_report(res: dict[str, Any]) -> str:
    lines = [f"subject CNN: test accuracy {res['cnn']['test_accuracy']:.3f} on 17 classes "
             f"({res['cnn']['seconds']:.0f}s training)", "",
             "verbalizer (attribute accuracy = mean of shape, position, orientation, count)",
             "| features | set | n | attribute acc. | shape | position | orientation | count "
             "| colour | digit | exact caption | BLEU-4 |", "|" + "---|" * 12]
    for name, r in res["verbalizer"].items():
        for split, m in r["sets"].items():
            a = m["accuracy"]
            cells = [f"{a[k]:.3f}" if k in a else "-" for k in
                     ("shape", "position", "orientation", "count", "colour", "digit")]
            head = "-" if split == "digits" else f"{m['attribute_accuracy']:.3f}"
            lines.append(f"| {name} | {split} | {m['n']} | {head} | "
                         + " | ".join(cells) + f" | {m['exact_caption']:.3f} | "
                         f"{m['bleu4']:.3f} |")
    lines += ["", "channel descriptions (median over channels of the correlation between the "
              "responses simulated from the sentence and the real ones)",
              "| subject | channels | valid_all (records) | held-out stimuli | primitives | "
              "digits |", "|---|---|---|---|---|---|"]
    for name, c in res["channels"].items():
        u = c["units"]
        lines.append(f"| {name} | {len(u)} | " + " | ".join(
            str(_median([x.get(k) for x in u])) for k in
            ("valid_all", "stimuli", "primitives", "digits")) + " |")
    verb, chans = res["verbalizer"], res["channels"]
    if "trained CNN" in verb and "trained CNN" in chans:
        held = verb["trained CNN"]["sets"]["heldout"]["attribute_accuracy"]
        gap = held - verb["untrained CNN"]["sets"]["heldout"]["attribute_accuracy"]
        med = _median([u["valid_all"] for u in chans["trained CNN"]["units"]]) or 0.0
        lines += ["", "targets (issue 7):",
                  f"  held-out attribute accuracy >= 0.90: {held:.3f} "
                  f"({'met' if held >= 0.9 else 'not met'})",
                  f"  ... >= 20 points above the untrained CNN: {100 * gap:+.1f} points "
                  f"({'met' if gap >= 0.2 else 'not met'})",
                  f"  median channel score (valid_all) >= 0.70: {med:.3f} "
                  f"({'met' if med >= 0.7 else 'not met'})"]
    lines.append(f"\ntotal time: {res['seconds']:.0f}s")
    return "\n".join(lines)


def _verbalize_cli(args: argparse.Namespace) -> None:
    import sys

    from neuroscribe.vision.verbalize import default_run, verbalize

    rows = verbalize(Path(args.image), Path(args.run) if args.run else default_run())
    for path, sentence, note in rows:
        if note:
            print(f"{path}: {note}", file=sys.stderr)
        print(f"{path}: {sentence}" if len(rows) > 1 else sentence)


def _report_cli(args: argparse.Namespace) -> None:
    from neuroscribe.cli import config_from
    from neuroscribe.vision.cnn import CNNConfig
    from neuroscribe.vision.verbalize import VerbalizerConfig

    res = report(config_from(args, VisionConfig), config_from(args, CNNConfig),
                 config_from(args, VerbalizerConfig), config_from(args, ChannelConfig),
                 Path(args.out), args.resume)
    print(format_report(res))
    print(f"report: {Path(args.out) / 'report.md'}  figures: filters.png (in channels/), "
          "verbalizer_examples.png")


def add_cli(sub: argparse._SubParsersAction) -> None:
    from neuroscribe.cli import add_config
    from neuroscribe.vision.cnn import CNNConfig
    from neuroscribe.vision.verbalize import VerbalizerConfig, default_run

    p = sub.add_parser("vision", help="CNN first layers in words: verbalizer and channels",
                       description=__doc__)
    vsub = p.add_subparsers(dest="vision_command", required=True)
    v = vsub.add_parser("verbalize", help="print the sentence for an image (or a folder)")
    v.add_argument("image", help="image file (.png, .jpg, .npy, ...) or a folder of them")
    v.add_argument("--run", default="", help="folder with the trained CNN and verbalizer "
                   f"(default {default_run()}; trained there on first use)")
    v.set_defaults(func=_verbalize_cli)
    r = vsub.add_parser("report", help="train or load the models, run both halves, write "
                        "the table and figures")
    r.add_argument("--out", required=True, help="run folder to write")
    r.add_argument("--resume", action="store_true", help="reuse a finished run in this folder")
    for cls in (VisionConfig, CNNConfig, VerbalizerConfig, ChannelConfig):
        add_config(r, cls)
    r.set_defaults(func=_report_cli)
    for q in (v, r):
        q.add_argument("--debug", action="store_true", help="show tracebacks")
        q.add_argument("-v", "--verbose", action="store_true", help="log progress details")
