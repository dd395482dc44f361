"""Subject CNNs for the vision half: a small CNN trained here, its untrained twin, any user CNN.

``SmallCNN`` (three 'conv -> ReLU -> pool' blocks and a linear head) is trained on the
procedural primitives (7 shape classes) and scikit-learn's digits (10 classes) in a minute or
two on one CPU thread (``train_cnn``). The same architecture at its seeded initialisation is the
untrained control. A user CNN is named ``package.module:attribute`` (an ``nn.Module`` or a
callable that returns one) or a ``.pt`` file holding a pickled module; any of its conv layers
(``--layer``, a module path such as ``features.0``) can be read.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroscribe.errors import UserError
from neuroscribe.runs import atomic_path, opt, write_json

N_CLASSES = 17  # 7 primitive shapes + 10 digits


@dataclass
class CNNConfig:
    """How to train the small subject CNN."""

    cnn_primitives: int = opt(6000, "procedural training images (plus the digits' train split)")
    cnn_epochs: int = opt(40, "training epochs")
    cnn_batch: int = opt(64, "images per step")
    cnn_lr: float = opt(3e-3, "Adam learning rate")
    cnn_noise: float = opt(0.1, "std of the Gaussian pixel noise added to every training batch")
    cnn_weight_decay: float = opt(1e-4, "Adam weight decay")
    cnn_grey: float = opt(0.5, "probability that a training image is shown in greyscale "
                          "(luminance), so the first layer learns colour-free edges as well")
    width: int = opt(16, "channels of the first conv layer (later layers have 2x and 4x)")
    seed: int = opt(0, "seed of the data and of the initialisation")


def small_cnn(width: int = 16, seed: int = 0) -> Any:
    """The subject architecture at its seeded initialisation (the untrained control)."""
    from collections import OrderedDict

    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, width, 5, padding=2)), ("act1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(width, 2 * width, 3, padding=1)), ("act2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(2 * width, 4 * width, 3, padding=1)), ("act3", nn.ReLU()),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()),
        ("fc", nn.Linear(4 * width, N_CLASSES))]))


def training_data(cfg: CNNConfig, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Primitives labelled by shape (0-6) and digits labelled 7 + digit."""
    from neuroscribe.vision.data import SHAPES, digits, primitives

    n = cfg.cnn_primitives if split == "train" else max(200, cfg.cnn_primitives // 6)
    px, pt = primitives(n, cfg.seed + (0 if split == "train" else 1), split)
    dx, dt = digits(split, cfg.seed)
    labels = [SHAPES.index(t["shape"]) for t in pt] + [7 + int(t["digit"]) for t in dt]
    return np.concatenate([px, dx]), np.array(labels, dtype=np.int64)


def accuracy(model: Any, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy()
                               for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def greyed(x: Any, p: float, gen: Any) -> Any:
    """``x`` [N, 3, H, W] with each image, at probability ``p``, replaced by its luminance
    (Rec. 601 weights) in all three channels."""
    import torch

    if p <= 0:
        return x
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    grey = torch.rand(len(x), 1, 1, 1, generator=gen) < p
    return torch.where(grey, (x * luma).sum(1, keepdim=True).expand_as(x), x)


def train_cnn(cfg: CNNConfig, out: Path) -> tuple[Any, dict[str, Any]]:
    """Train the small CNN; save ``out/cnn.pt`` (state dict) and ``out/cnn.json`` (config and
    metrics). Reuses a finished model trained with the same config."""
    import torch

    meta_path = out / "cnn.json"
    if meta_path.exists() and (out / "cnn.pt").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("config") == asdict(cfg):
            return load_small_cnn(out / "cnn.pt", cfg.width), meta
    x, y = training_data(cfg, "train")
    xt, yt = training_data(cfg, "test")
    model = small_cnn(cfg.width, cfg.seed)
    opt_ = torch.optim.Adam(model.parameters(), lr=cfg.cnn_lr,
                            weight_decay=cfg.cnn_weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.perf_counter()
    losses = []
    for _ in range(cfg.cnn_epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), cfg.cnn_batch):
            idx = perm[i:i + cfg.cnn_batch]
            xb = greyed(xs[idx], cfg.cnn_grey, gen)
            xb = xb + cfg.cnn_noise * torch.randn(xb.shape, generator=gen)
            loss = torch.nn.functional.cross_entropy(model(xb), ys[idx])
            opt_.zero_grad()
            loss.backward()
            opt_.step()
            losses.append(float(loss.detach()))
    meta = {"config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(np.mean(losses[-20:])), 4),
            "train_accuracy": round(accuracy(model, x, y), 4),
            "test_accuracy": round(accuracy(model, xt, yt), 4), "n_train": len(x)}
    with atomic_path(out / "cnn.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    write_json(meta_path, meta)
    return model.eval(), meta


def load_small_cnn(path: Path, width: int = 16) -> Any:
    import torch

    model = small_cnn(width)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def load_user_cnn(spec: str) -> Any:
    """``package.module:attribute`` (a module or a callable returning one) or a ``.pt`` file."""
    import importlib

    import torch

    if spec.endswith((".pt", ".pth")):
        if not Path(spec).is_file():
            raise UserError(f"model file {spec} does not exist")
        model = torch.load(spec, map_location="cpu", weights_only=False)
    else:
        mod_name, _, attr = spec.partition(":")
        try:
            obj: Any = importlib.import_module(mod_name)
        except ImportError as e:
            raise UserError(f"cannot import {mod_name!r} for model {spec!r}: {e}") from None
        for part in filter(None, attr.split(".")):
            if not hasattr(obj, part):
                raise UserError(f"{mod_name!r} has no attribute {attr!r} (model {spec!r})")
            obj = getattr(obj, part)
        model = obj if isinstance(obj, torch.nn.Module) else obj() if callable(obj) else obj
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model {spec!r} is a {type(model).__name__}, not a torch nn.Module")
    return model.eval()


def conv_layers(model: Any) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def conv_layer(model: Any, path: str) -> Any:
    """The ``nn.Conv2d`` at a module path; a clear error for anything else."""
    import torch

    modules = dict(model.named_modules())
    convs = conv_layers(model)
    if path not in modules:
        near = difflib.get_close_matches(path, list(modules), n=3) or convs[:5]
        raise UserError(f"no module {path!r} in the model; did you mean {', '.join(near)}?")
    layer = modules[path]
    if not isinstance(layer, torch.nn.Conv2d):
        raise UserError(f"module {path!r} is a {type(layer).__name__}, not a conv layer "
                        f"(nn.Conv2d); conv layers: {', '.join(convs) or 'none'}")
    return layer


class _Stop(Exception):
    pass


def activations(model: Any, layer: str, images: np.ndarray, rectify: bool = True,
                batch: int = 256) -> np.ndarray:
    """Output of the conv layer at ``layer`` for ``images`` [N, 3, H, W] -> [N, C, h, w]; the
    forward pass stops there. ``rectify`` applies a ReLU (the first layer's nonlinearity)."""
    import torch

    conv = conv_layer(model, layer)
    want = conv.in_channels if layer == conv_layers(model)[0] else None
    if images.ndim != 4 or (want is not None and images.shape[1] != want):
        raise UserError(f"images have shape {tuple(images.shape)}; {layer} wants "
                        f"[N, {want}, H, W]")
    got: list[Any] = []

    def hook(_m: Any, _i: Any, out: Any) -> None:
        got.append(out.detach())
        raise _Stop

    handle = conv.register_forward_hook(hook)
    outs = []
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                got.clear()
                with contextlib.suppress(_Stop):
                    model(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
                a = got[0]
                outs.append((torch.relu(a) if rectify else a).numpy())
    finally:
        handle.remove()
    if not outs:
        return np.zeros((0, conv.out_channels, 0, 0), np.float32)
    return np.concatenate(outs).astype(np.float32)
