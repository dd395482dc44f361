"""The activation verbalizer: first-layer activation maps -> structured attributes -> a caption.

The verbalizer is a probe, kept shallow on purpose (Hewitt and Liang's point about control
tasks): one 3 x 3 conv over the maps (``depth`` 1; more layers on request), then, at every map
position, linear heads for shape, colour, contrast, scale and orientation, averaged with a
learned attention over positions, so an object is named the same wherever it is. Count reads
globally pooled features, digit, stroke and slant the maps' 4 x 4 layout, and a 1 x 1 head
scores the 3 x 3 grid cells.
A deep verbalizer would learn to see by itself, and the untrained CNN's random maps would serve
it nearly as well as the trained ones. Training zeroes random input channels (``channel_drop``)
so no word leans on one channel. The prediction is turned into a ground-truth-shaped dict (only
the values the predicted shape allows; the ``count`` best cells) and captioned by the
generator's own template. Metrics: per-attribute accuracy, exact-caption rate, corpus BLEU-4.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroscribe.errors import UserError
from neuroscribe.runs import atomic_path, opt, write_json
from neuroscribe.vision.data import ATTRIBUTES, N_CELLS, ORIENTED, SCALES, caption

HEADLINE = ("shape", "position", "orientation", "count")
LOCAL = ("shape", "colour", "contrast", "scale", "orientation")  # named where the object is
LAYOUT = ("digit", "stroke", "slant")  # read from the maps' 4 x 4 layout


@dataclass
class VerbalizerConfig:
    """How to train and test the activation verbalizer."""

    n_train: int = opt(6000, "training primitives (plus up to a quarter as many digits from "
                       "their train split)")
    n_test: int = opt(800, "in-distribution test primitives")
    n_heldout: int = opt(800, "test primitives with generator settings never seen in training")
    verb_epochs: int = opt(16, "verbalizer training epochs")
    verb_batch: int = opt(64, "verbalizer images per step")
    verb_lr: float = opt(2e-3, "verbalizer Adam learning rate")
    hidden: int = opt(128, "verbalizer hidden width")
    depth: int = opt(1, "conv layers of the verbalizer's encoder (1-3; deeper reads "
                     "random maps nearly as well as trained ones)")
    channel_drop: float = opt(0.5, "probability of zeroing each input channel of a training "
                              "image")
    flip: bool = opt(True, "add mirror images of the training primitives (relabelled; those "
                     "that would show a held-out setting are dropped)")


def build_verbalizer(in_channels: int, hidden: int = 128, depth: int = 1) -> Any:
    """A ``depth``-layer conv encoder (64 channels, the first at stride 2), per-position heads
    for ``LOCAL`` pooled by attention, global heads for the rest, and a cell head."""
    import torch
    from torch import nn

    width = 64

    class Verbalizer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(in_channels, 1, 1))
            self.register_buffer("std", torch.ones(in_channels, 1, 1))
            layers: list[nn.Module] = []
            for i in range(depth):
                layers += [nn.Conv2d(in_channels if i == 0 else width, width, 3,
                                     stride=2 if i < 2 else 1, padding=1), nn.ReLU()]
            self.encoder = nn.Sequential(*layers)
            self.mlp = nn.Sequential(nn.Linear(2 * width, hidden), nn.ReLU())
            self.layout = nn.Sequential(nn.Linear(16 * width, hidden), nn.ReLU())
            self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in
                                        ATTRIBUTES.items() if k not in LOCAL})
            self.local = nn.Sequential(nn.Conv2d(width, hidden, 1), nn.ReLU())
            self.local_heads = nn.ModuleDict({k: nn.Conv2d(hidden, len(ATTRIBUTES[k]), 1)
                                              for k in LOCAL})
            self.attention = nn.Conv2d(width, 1, 1)
            self.cells = nn.Conv2d(width, 1, 1)

        def forward(self, x: Any) -> dict[str, Any]:
            fmap = self.encoder((x - self.mean) / self.std)
            h = self.mlp(torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], 1))
            lay = self.layout(nn.functional.adaptive_avg_pool2d(fmap, 4).flatten(1))
            where = torch.softmax(self.attention(fmap).flatten(2), -1)  # [B, 1, positions]
            local = self.local(fmap)
            out = {k: (m(local).flatten(2) * where).sum(-1) for k, m in self.local_heads.items()}
            out["cells"] = nn.functional.adaptive_max_pool2d(self.cells(fmap), 3).flatten(1)
            return {**out, **{k: m(lay if k in LAYOUT else h) for k, m in self.heads.items()}}

    return Verbalizer()


def targets(truths: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Class indices per attribute (-100 where an image has none) and the 0/1 cell grid."""
    out = {k: np.array([v.index(str(t[k])) if t.get(k) is not None else -100 for t in truths])
           for k, v in ATTRIBUTES.items()}
    cells = np.zeros((len(truths), N_CELLS), np.float32)
    for i, t in enumerate(truths):
        cells[i, t["cells"]] = 1
    out["cells"] = cells
    return out


def train_verbalizer(x: np.ndarray, truths: list[dict[str, Any]], cfg: VerbalizerConfig,
                     seed: int = 0) -> Any:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    if not 1 <= cfg.depth <= 3:
        raise UserError(f"--depth must be 1, 2 or 3, not {cfg.depth}")
    model = build_verbalizer(x.shape[1], cfg.hidden, cfg.depth)
    model.mean.copy_(torch.from_numpy(x.mean(axis=(0, 2, 3))[:, None, None]))
    model.std.copy_(torch.from_numpy(x.std(axis=(0, 2, 3))[:, None, None] + 1e-6))
    tg = {k: torch.from_numpy(v) for k, v in targets(truths).items()}
    xs = torch.from_numpy(x)
    opt_ = torch.optim.Adam(model.parameters(), lr=cfg.verb_lr)
    steps = cfg.verb_epochs * math.ceil(len(x) / cfg.verb_batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt_, cfg.verb_lr, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.verb_epochs):
        perm = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), cfg.verb_batch):
            idx = perm[i:i + cfg.verb_batch]
            xb = xs[idx]
            if cfg.channel_drop > 0:
                keep = torch.rand(len(idx), xb.shape[1], 1, 1, generator=gen) >= cfg.channel_drop
                xb = xb * keep
            out = model(xb)
            loss = F.binary_cross_entropy_with_logits(out["cells"], tg["cells"][idx])
            for k in ATTRIBUTES:
                y = tg[k][idx]
                if (y >= 0).any():
                    loss = loss + F.cross_entropy(out[k], y, ignore_index=-100)
            opt_.zero_grad()
            loss.backward()
            opt_.step()
            sched.step()
    return model.eval()


def _pick(logits: np.ndarray, name: str, allowed: Sequence[str]) -> str:
    values = ATTRIBUTES[name]
    idx = [values.index(a) for a in allowed]
    return values[idx[int(np.argmax(logits[idx]))]]


def decode(out: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """A ground-truth-shaped prediction for image ``i`` of a batch of head outputs."""
    shape = ATTRIBUTES["shape"][int(out["shape"][i].argmax())]
    if shape == "digit":
        return {"shape": "digit", "cells": [], "count": 1, "orientation": None, "scale": None,
                **{k: ATTRIBUTES[k][int(out[k][i].argmax())]
                   for k in ("digit", "stroke", "slant", "colour", "contrast")}}
    pred: dict[str, Any] = {
        "shape": shape, "colour": _pick(out["colour"][i], "colour", ATTRIBUTES["colour"]),
        "contrast": _pick(out["contrast"][i], "contrast", ATTRIBUTES["contrast"]),
        "scale": _pick(out["scale"][i], "scale", list(SCALES.get(shape, ("small", "large")))),
        "orientation": (_pick(out["orientation"][i], "orientation", ORIENTED[shape])
                        if shape in ORIENTED else None)}
    if shape == "grating":
        return {**pred, "count": 1, "cells": []}
    count = int(ATTRIBUTES["count"][int(out["count"][i].argmax())])
    return {**pred, "count": count,
            "cells": sorted(int(c) for c in np.argsort(-out["cells"][i])[:count])}


def predict(model: Any, x: np.ndarray, batch: int = 256) -> list[dict[str, Any]]:
    import torch

    preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = {k: v.numpy() for k, v in model(torch.from_numpy(x[i:i + batch])).items()}
            preds += [decode(out, j) for j in range(len(next(iter(out.values()))))]
    return preds


def bleu(references: Sequence[str], hypotheses: Sequence[str], n: int = 4) -> float:
    """Corpus BLEU-n (Papineni et al.): clipped n-gram precisions, brevity penalty."""
    matches, totals = [0] * n, [0] * n
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = ref.split(), hyp.split()
        ref_len, hyp_len = ref_len + len(r), hyp_len + len(h)
        for k in range(1, n + 1):
            hc = Counter(tuple(h[i:i + k]) for i in range(len(h) - k + 1))
            rc = Counter(tuple(r[i:i + k]) for i in range(len(r) - k + 1))
            matches[k - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[k - 1] += max(len(h) - k + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def _attr_ok(name: str) -> Callable[[dict, dict], bool | None]:
    """Whether a prediction gets one attribute right (None: the image has no such attribute)."""
    def ok(t: dict[str, Any], p: dict[str, Any]) -> bool | None:
        if t["shape"] in ("digit", "grating") and name in ("position", "count"):
            return None
        if name == "position":
            return sorted(p.get("cells", [])) == sorted(t["cells"])
        if t.get(name) is None:
            return None
        return str(p.get(name)) == str(t[name])
    return ok


def metrics(truths: Sequence[dict[str, Any]], preds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    names = ("shape", "position", "orientation", "count", "colour", "contrast", "scale", "digit")
    acc = {}
    for name in names:
        oks = [o for o in (_attr_ok(name)(t, p) for t, p in zip(truths, preds)) if o is not None]
        if oks:
            acc[name] = round(float(np.mean(oks)), 4)
    refs, hyps = [caption(t) for t in truths], [caption(p) for p in preds]
    head = [acc[k] for k in HEADLINE if k in acc]
    return {"n": len(truths), "accuracy": acc,
            "attribute_accuracy": round(float(np.mean(head)), 4) if head else None,
            "exact_caption": round(float(np.mean([r == h for r, h in zip(refs, hyps)])), 4),
            "bleu4": round(bleu(refs, hyps), 4)}


def evaluate_features(name: str, features: Callable[[np.ndarray], np.ndarray],
                      data: dict[str, tuple[np.ndarray, list[dict]]], cfg: VerbalizerConfig,
                      out: Path, seed: int = 0, subject: dict[str, Any] | None = None
                      ) -> tuple[Any, dict[str, Any]]:
    """Train a verbalizer on ``features(train images)``; test it on every other set; save
    ``out/verbalizer_<name>.pt`` and ``.json`` (its config, the ``subject`` CNN's config and
    the metrics)."""
    import torch

    t0 = time.perf_counter()
    x, truths = data["train"]
    model = train_verbalizer(features(x), truths, cfg, seed)
    res: dict[str, Any] = {"features": name, "config": asdict(cfg), "subject": subject,
                           "seconds": 0.0, "sets": {}}
    for split, (xs, ts) in data.items():
        if split != "train":
            res["sets"][split] = metrics(ts, predict(model, features(xs)))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_path(out / f"verbalizer_{name}.pt") as tmp:
        torch.save({"state": model.state_dict(), "in_channels": int(model.mean.shape[0]),
                    "hidden": cfg.hidden, "depth": cfg.depth}, tmp)
    write_json(out / f"verbalizer_{name}.json", res)
    return model, res


def load_verbalizer(path: Path) -> Any:
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if "depth" not in blob:
        raise UserError(f"{path} was saved by an older neuroscribe with another verbalizer; "
                        "delete it (or run `neuroscribe vision report` again) to retrain")
    model = build_verbalizer(blob["in_channels"], blob["hidden"], blob["depth"])
    model.load_state_dict(blob["state"])
    return model.eval()


def mirrored(x: np.ndarray, truths: list[dict[str, Any]]) -> tuple[np.ndarray, list[dict]]:
    """Left-right mirror images with their truths, minus any that show a held-out setting."""
    from neuroscribe.vision.data import SIZE, is_held_out

    swap = {"rising": "falling", "falling": "rising"}
    keep, out = [], []
    for i, t in enumerate(truths):
        m = {**t, "cells": sorted(c // 3 * 3 + 2 - c % 3 for c in t["cells"]),
             "orientation": swap.get(t["orientation"], t["orientation"])}
        if "objects" in t:
            m["objects"] = [{**o, "cx": SIZE - o["cx"]} for o in t["objects"]]
        if "angle" in t and t["shape"] != "cross":
            m["angle"] = (180.0 - t["angle"]) % 180
        if not is_held_out(m):
            keep.append(i)
            out.append(m)
    return np.ascontiguousarray(x[keep][..., ::-1]), out


def verbalizer_data(cfg: VerbalizerConfig, seed: int = 0) -> dict[str, tuple[np.ndarray, list]]:
    """train (primitives + digits), test, heldout (primitives), its two parts (an unseen
    shape-colour pair; only unseen shape-cell pairs) and digits (test split)."""
    from neuroscribe.vision.data import HELD_OUT_COLOUR, digits, primitives

    px, pt = primitives(cfg.n_train, seed, "train")
    if cfg.flip:
        fx, ft = mirrored(px, pt)
        px, pt = np.concatenate([px, fx]), pt + ft
    dx, dt = digits("train", seed, limit=len(pt) // 4)
    hx, ht = primitives(cfg.n_heldout, seed + 2, "heldout")
    colour = np.array([(t["shape"], t["colour"]) in HELD_OUT_COLOUR for t in ht], dtype=bool)
    return {"train": (np.concatenate([px, dx]), pt + dt),
            "test": primitives(cfg.n_test, seed + 1, "test"), "heldout": (hx, ht),
            "heldout-colour": (hx[colour], [t for t, c in zip(ht, colour) if c]),
            "heldout-cell": (hx[~colour], [t for t, c in zip(ht, colour) if not c]),
            "digits": digits("test", seed)}


def default_run() -> Path:
    return Path.home() / ".cache" / "neuroscribe" / "vision"


def verbalize(target: Path, run: Path) -> list[tuple[Path, str, str]]:
    """(file, sentence, note) for an image or every image of a folder, with the trained CNN
    and verbalizer of ``run`` (trained there first, a few minutes, if missing)."""
    import json
    import sys

    from neuroscribe.vision.cnn import CNNConfig, activations, train_cnn
    from neuroscribe.vision.data import image_files, load_image

    files = image_files(target)
    loaded = [load_image(p) for p in files]
    cnn, meta = train_cnn(CNNConfig(), run / "cnn")
    path = run / "verbalizer" / "verbalizer_trained.pt"
    cfg = VerbalizerConfig()
    made = path.with_suffix(".json")
    saved = json.loads(made.read_text()) if made.exists() else {}
    if path.exists() and saved.get("subject") == meta["config"] and saved.get(
            "config") == asdict(cfg):
        model = load_verbalizer(path)
    else:  # none yet, or one made for another CNN or with another config
        print(f"training the verbalizer into {run} (once, a few minutes)", file=sys.stderr)
        model, _ = evaluate_features("trained", lambda x: activations(cnn, "conv1", x),
                                     verbalizer_data(cfg), cfg, run / "verbalizer", 0,
                                     meta["config"])
    x = np.stack([a for a, _ in loaded])
    preds = predict(model, activations(cnn, "conv1", x))
    return [(p, caption(pred), note) for p, pred, (_, note) in zip(files, preds, loaded)]


def examples_figure(images: np.ndarray, truths: Sequence[dict[str, Any]],
                    preds: Sequence[dict[str, Any]], path: Path, cols: int = 4) -> None:
    """A PNG of images with the verbalizer's sentence (green: exact, red: not) and the truth."""
    import textwrap

    from neuroscribe.vision.data import figure_grid, save_figure

    fig, cells = figure_grid(len(images), cols, 3.4)
    for ax, img, t, p in zip(cells, images, truths, preds):
        said, true = caption(p), caption(t)
        ax.imshow(np.moveaxis(img, 0, -1), interpolation="nearest")
        ax.set_title("said: " + "\n".join(textwrap.wrap(said, 44)) + "\ntruth: "
                     + "\n".join(textwrap.wrap(true, 44)), fontsize=6.5, loc="left",
                     color="#1b7f3b" if said == true else "#b22222")
    save_figure(fig, path)
