"""Images with known content: procedural primitives and scikit-learn's digits, each captioned.

Every image is ``float32 [3, 32, 32]`` in 0..1 and comes with a structured ground truth (a
JSON-able dict) and a caption made from it by the templates in ``data/vision/captions.json``.
Primitives sit in the cells of a 3 x 3 grid (one object per cell), so the ground truth
position of an image is the set of cells it occupies. Everything is reproducible from a seed.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from neuroscribe.errors import UserError

SIZE = 32
SUPERSAMPLE = 4
SHAPES = ("line", "circle", "square", "triangle", "cross", "blob", "grating")
COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0), "red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.2),
    "blue": (0.2, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}
CONTRASTS = {"high": 1.0, "low": 0.5}
ORIENTED = {"line": ("horizontal", "vertical", "rising", "falling"),
            "grating": ("horizontal", "vertical", "rising", "falling"),
            "cross": ("upright", "diagonal")}
ANGLES = {"horizontal": 0.0, "rising": 45.0, "vertical": 90.0, "falling": 135.0,
          "upright": 0.0, "diagonal": 45.0}
SCALES = {"line": {"thin": 1.2, "thick": 2.4}, "grating": {"coarse": 0.09, "fine": 0.2},
          "blob": {"small": 1.2, "large": 1.8}}
DEFAULT_SCALES = {"small": 2.8, "large": 3.8}  # half-size in pixels of the other shapes
# Generator settings never seen in training: these (shape, colour) pairs and (shape, cell) pairs
# appear only in the held-out split.
HELD_OUT_COLOUR = {("line", "green"), ("circle", "yellow"), ("square", "red"),
                   ("triangle", "blue"), ("cross", "white"), ("blob", "green"),
                   ("grating", "red")}
HELD_OUT_CELL = {("circle", 0), ("square", 4), ("triangle", 8), ("cross", 2), ("line", 6),
                 ("blob", 4)}
# The attributes a verbalizer predicts, with their values (None where an image has none).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": (*SHAPES, "digit"), "colour": tuple(COLOURS), "contrast": tuple(CONTRASTS),
    "count": ("1", "2", "3"),
    "orientation": ("horizontal", "vertical", "rising", "falling", "upright", "diagonal"),
    "scale": ("small", "large", "thin", "thick", "coarse", "fine"),
    "digit": tuple("0123456789"), "stroke": ("thin", "thick"),
    "slant": ("left", "upright", "right")}
N_CELLS = 9
CELL = SIZE / 3


@lru_cache(maxsize=1)
def caption_words() -> dict[str, Any]:
    text = resources.files("neuroscribe").joinpath("data/vision/captions.json").read_text()
    return json.loads(text)


def _where(cells: list[int]) -> str:
    names = [f"the {caption_words()['positions'][c]}" for c in sorted(cells)]
    if not names:
        return "no particular place"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def caption(truth: dict[str, Any]) -> str:
    """The sentence for a ground truth (or a predicted one: the same keys)."""
    w = caption_words()
    if truth["shape"] == "digit":
        return w["templates"]["digit"].format(digit=truth["digit"], stroke=truth["stroke"],
                                              slant=w["slant"][truth["slant"]])
    orient = truth.get("orientation")
    parts = {"contrast": w["contrast"][truth["contrast"]], "scale": truth["scale"],
             "colour": truth["colour"],
             "orientation": f"{w['orientation'][orient]} " if orient else ""}
    if truth["shape"] == "grating":
        return w["templates"]["grating"].format(**parts)
    count = str(truth["count"])
    noun = w["nouns"][truth["shape"]][0 if count == "1" else 1]
    return w["templates"]["object"].format(count=w["count"][count], noun=noun,
                                           where=_where(truth["cells"]), **parts)


def is_held_out(truth: dict[str, Any]) -> bool:
    shape = truth["shape"]
    return ((shape, truth["colour"]) in HELD_OUT_COLOUR
            or any((shape, c) in HELD_OUT_CELL for c in truth["cells"]))


def sample_truth(rng: np.random.Generator) -> dict[str, Any]:
    """Random generator settings for one primitive image (no pixels yet)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    contrast = "high" if rng.random() < 0.7 else "low"
    scale_names = list(SCALES.get(shape, DEFAULT_SCALES))
    orients = ORIENTED.get(shape)
    truth: dict[str, Any] = {
        "shape": shape, "colour": colour, "contrast": contrast,
        "scale": scale_names[rng.integers(len(scale_names))],
        "orientation": orients[rng.integers(len(orients))] if orients else None,
        "background": float(rng.uniform(0.0, 0.1))}
    if shape == "grating":
        truth.update(count=1, cells=[], phase=float(rng.uniform(0, 2 * np.pi)))
    else:
        n = int(rng.integers(1, 4))
        cells = sorted(int(c) for c in rng.choice(N_CELLS, size=n, replace=False))
        truth.update(count=n, cells=cells, objects=[
            {"cy": float((c // 3 + 0.5) * CELL + rng.uniform(-0.75, 0.75)),
             "cx": float((c % 3 + 0.5) * CELL + rng.uniform(-0.75, 0.75))} for c in cells])
    if truth["orientation"] is not None:
        jitter = 0.0 if shape == "cross" else float(rng.uniform(-5, 5))
        truth["angle"] = ANGLES[truth["orientation"]] + jitter
    return truth


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(SIZE * s, dtype=np.float32) + 0.5) / s
    return c[:, None], c[None, :]  # y (rows, downwards), x


def _rotated(y: np.ndarray, x: np.ndarray, cy: float, cx: float,
             angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (u) and across (v) a direction ``angle`` degrees anticlockwise."""
    a = np.deg2rad(angle)
    dx, dy = x - cx, y - cy
    return dx * np.cos(a) - dy * np.sin(a), dx * np.sin(a) + dy * np.cos(a)


def _triangle(y: np.ndarray, x: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    verts = [(cx + r * np.cos(np.deg2rad(t)), cy - r * np.sin(np.deg2rad(t)))
             for t in (90, 210, 330)]
    inside = np.ones(np.broadcast(y, x).shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(verts, verts[1:] + verts[:1]):
        inside &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) <= 0
    return inside


def object_mask(truth: dict[str, Any], cy: float, cx: float) -> np.ndarray:
    """Coverage (0..1) of one object on the 32 x 32 grid."""
    shape = truth["shape"]
    if shape == "blob":
        y, x = _grid(1)
        sigma = SCALES["blob"][truth["scale"]]
        return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2)).astype(np.float32)
    y, x = _grid(SUPERSAMPLE)
    r = DEFAULT_SCALES.get(truth["scale"], 0.0)
    if shape == "line":
        u, v = _rotated(y, x, cy, cx, truth["angle"])
        m = (np.abs(u) <= 3.75) & (np.abs(v) <= SCALES["line"][truth["scale"]] / 2)
    elif shape == "circle":
        m = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    elif shape == "square":
        m = (np.abs(y - cy) <= r * 0.85) & (np.abs(x - cx) <= r * 0.85)
    elif shape == "triangle":
        m = _triangle(y, x, cy, cx, r * 1.1)
    else:  # cross
        u, v = _rotated(y, x, cy, cx, truth["angle"])
        t = 0.5 + 0.2 * r
        m = ((np.abs(u) <= r) & (np.abs(v) <= t)) | ((np.abs(v) <= r) & (np.abs(u) <= t))
    s = SUPERSAMPLE
    return m.astype(np.float32).reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))


def grating_pattern(angle: float, frequency: float, phase: float) -> np.ndarray:
    """0..1 sinusoid whose stripes run along ``angle`` (so it varies across them)."""
    y, x = _grid(1)
    _, v = _rotated(y, x, SIZE / 2, SIZE / 2, angle)
    return (0.5 + 0.5 * np.cos(2 * np.pi * frequency * v + phase)).astype(np.float32)


def render(truth: dict[str, Any], rng: np.random.Generator | None = None,
           noise: float = 0.02) -> np.ndarray:
    """The image [3, 32, 32] that a ground truth describes (pixel noise from ``rng``)."""
    if truth["shape"] == "grating":
        cover = grating_pattern(truth["angle"], SCALES["grating"][truth["scale"]],
                                truth["phase"])
    else:
        cover = np.zeros((SIZE, SIZE), dtype=np.float32)
        for o in truth["objects"]:
            cover = np.maximum(cover, object_mask(truth, o["cy"], o["cx"]))
    ink = np.array(COLOURS[truth["colour"]], dtype=np.float32) * CONTRASTS[truth["contrast"]]
    bg = np.float32(truth["background"])
    img = bg + (ink[:, None, None] - bg) * cover[None]
    if rng is not None and noise > 0:
        img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def primitives(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, list[dict]]:
    """``n`` images and truths. ``train``/``test`` never hold a held-out setting; ``heldout``
    holds only images with at least one."""
    want_held = {"train": False, "test": False, "heldout": True}[split]
    rng = np.random.default_rng([seed, ("train", "test", "heldout").index(split)])
    images, truths = [], []
    while len(truths) < n:
        t = sample_truth(rng)
        if is_held_out(t) != want_held:
            continue
        images.append(render(t, rng))
        truths.append(t)
    return np.stack(images) if images else np.zeros((0, 3, SIZE, SIZE), np.float32), truths


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def digit_truth(img8: np.ndarray, label: int, ink_median: float) -> dict[str, Any]:
    """Label and stroke properties computed from the 8 x 8 image."""
    ys, xs = np.mgrid[0:8, 0:8].astype(np.float64)
    w = img8.astype(np.float64) / max(float(img8.sum()), 1e-9)
    my, mx = (w * ys).sum(), (w * xs).sum()
    var_y = (w * (ys - my) ** 2).sum()
    shear = -(w * (xs - mx) * (ys - my)).sum() / max(var_y, 1e-9)  # x shift per row upwards
    slant = "right" if shear > 0.15 else "left" if shear < -0.15 else "upright"
    return {"shape": "digit", "digit": str(int(label)), "colour": "white", "contrast": "high",
            "stroke": "thick" if float(img8.mean()) > ink_median else "thin", "slant": slant,
            "slant_value": float(shear), "ink": float(img8.mean()), "cells": [], "count": 1,
            "orientation": None, "scale": None}


def digits(split: str = "train", seed: int = 0,
           limit: int | None = None) -> tuple[np.ndarray, list[dict]]:
    """scikit-learn's bundled digits, upscaled 4x to 32 x 32 (white on black), 70/30 split."""
    raw, labels = _digits_raw()
    order = np.random.default_rng(seed).permutation(len(raw))
    cut = int(0.7 * len(raw))
    idx = {"train": order[:cut], "test": order[cut:], "all": order}[split][:limit]
    median = float(np.median(raw.mean(axis=(1, 2))))
    imgs = np.kron(raw[idx], np.ones((4, 4), np.float32))
    truths = [digit_truth(raw[i], int(labels[i]), median) for i in idx]
    return np.repeat(imgs[:, None], 3, axis=1).astype(np.float32), truths


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".npy")


def load_image(path: Path, size: int = 32) -> tuple[np.ndarray, str]:
    """An image file as float32 [3, size, size] in 0..1, and a note on what was changed.

    Grey images are repeated over RGB and RGBA is flattened onto black; another size is
    resized. A ``.npy`` array may be [H, W], [H, W, C] or [C, H, W] with C 1 or 3.
    """
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() == ".npy":
        a = np.load(path).astype(np.float32)
        if a.ndim == 2:
            a = a[None]
        elif a.ndim == 3 and a.shape[-1] in (1, 3) and a.shape[0] not in (1, 3):
            a = np.moveaxis(a, -1, 0)
        if a.ndim != 3 or a.shape[0] not in (1, 3):
            raise UserError(f"{path}: array of shape {a.shape}; an image needs 1 (grey) or 3 "
                            "(RGB) channels: [H, W], [H, W, C] or [C, H, W]")
        a = a / 255.0 if a.max() > 1.0 else a
        img = Image.fromarray((np.clip(np.moveaxis(np.repeat(a, 3 // a.shape[0], 0), 0, -1),
                                       0, 1) * 255).astype(np.uint8))
    else:
        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{path}: not an image that can be read ({e})") from None
    notes = []
    if img.mode not in ("RGB", "L"):
        notes.append(f"mode {img.mode} converted to RGB")
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            black = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(black, img)
    img = img.convert("RGB")
    if img.size != (size, size):
        notes.append(f"resized {img.size[0]}x{img.size[1]} -> {size}x{size}")
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(arr), "; ".join(notes)


def image_files(target: Path) -> list[Path]:
    if not target.exists():
        raise UserError(f"{target} does not exist")
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"no images in folder {target} (looked for "
                            f"{', '.join(IMAGE_SUFFIXES)})")
        return files
    return [target]


def figure_grid(n: int, cols: int, cell_height: float) -> tuple[Any, list[Any]]:
    """A matplotlib figure of ``n`` image cells, ``cols`` wide, axes off: (figure, cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, cell_height * rows), dpi=90,
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, list(axes.ravel())[:n]


def save_figure(fig: Any, path: Any) -> None:
    """Write a figure as PNG atomically, then free it."""
    import matplotlib.pyplot as plt

    from neuroscribe.runs import atomic_path

    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
