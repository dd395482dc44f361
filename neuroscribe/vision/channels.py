"""Per-channel descriptions of a conv layer: measure tuning, describe, simulate from words, score.

Tuning is measured at the centre of the layer's output map, on full-field gratings (orientation
x spatial frequency x phase, along four colour axes), Gaussian spots, and uniform colour fields.
The tuning becomes one sentence by the templates in ``data/vision/descriptions.json``. The
simulator reads only that sentence back (the same vocabulary, parsed), builds the filter it
describes (a Gabor, a difference of Gaussians, a uniform term) and predicts the channel's
response maps on images it never saw; the score is the correlation with the real maps.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

STIM = 33  # odd: the centre pixel is the receptive-field centre of the centre output
ANGLES = np.arange(0, 180, 15, dtype=np.float64)
FREQS = np.array([0.04, 0.06, 0.09, 0.13, 0.18, 0.24, 0.32, 0.42])
PHASES = np.arange(8) * (2 * np.pi / 8)
SPOT_SIGMAS = (0.8, 1.2, 1.8, 2.7, 4.0)
APERTURES = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.5, 8.0, 11.0, 16.5)


@lru_cache(maxsize=1)
def words() -> dict[str, Any]:
    text = resources.files("neuroscribe").joinpath("data/vision/descriptions.json").read_text()
    return json.loads(text)


def axis_rgb(name: str) -> np.ndarray:
    v = np.array(words()["axes"][name]["rgb"], dtype=np.float64)
    return v / np.linalg.norm(v)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float64) - (size - 1) / 2
    return c[:, None], c[None, :]  # y (down), x


def across(angle: float, size: int) -> np.ndarray:
    """Signed distance from the centre across stripes that run along ``angle`` degrees
    (anticlockwise from horizontal; positive towards (sin a, cos a) in x, y-down)."""
    y, x = _coords(size)
    a = np.deg2rad(angle)
    return x * np.sin(a) + y * np.cos(a)


def _colour(pattern: np.ndarray, axis: np.ndarray, amp: float = 0.5) -> np.ndarray:
    """A mid-grey image modulated by ``pattern`` (-1..1) along an RGB axis: [3, H, W]."""
    return np.clip(0.5 + amp * axis[:, None, None] * pattern[None], 0, 1)


def centre_responses(model: Any, layer: str, images: np.ndarray) -> np.ndarray:
    """Each channel's unrectified response at the centre of the output map: [N, C]."""
    from neuroscribe.vision.cnn import activations

    a = activations(model, layer, images.astype(np.float32), rectify=False)
    return a[:, :, a.shape[2] // 2, a.shape[3] // 2].astype(np.float64)


def measure_tuning(model: Any, layer: str, in_channels: int = 3) -> list[dict[str, Any]]:
    """Tuning of every channel of ``layer`` (one batch of stimuli for all channels)."""
    axes = list(words()["axes"])
    stims, keys = [], []
    for ax in axes:
        for ai, ang in enumerate(ANGLES):
            v = across(ang, STIM)
            for fi, f in enumerate(FREQS):
                for p in PHASES:
                    stims.append(_colour(np.cos(2 * np.pi * f * v + p), axis_rgb(ax)))
                keys.append((ax, ai, fi))
    n_grat = len(stims)
    y, x = _coords(STIM)
    for ax in axes:
        for s in SPOT_SIGMAS:
            g = np.exp(-(x**2 + y**2) / (2 * s**2))
            stims += [_colour(g, axis_rgb(ax)), _colour(-g, axis_rgb(ax))]
    for ax in axes:
        ones = np.ones((STIM, STIM))
        stims += [_colour(ones, axis_rgb(ax)), _colour(-ones, axis_rgb(ax))]
    stims.append(np.full((3, STIM, STIM), 0.5))
    batch = np.stack(stims)
    if in_channels == 1:
        batch = batch.mean(axis=1, keepdims=True)
    r = centre_responses(model, layer, batch)  # [N, C]
    grat = r[:n_grat].reshape(len(axes), len(ANGLES), len(FREQS), len(PHASES), -1)
    z = (2 / len(PHASES)) * np.einsum("xafpc,p->xafc", grat, np.exp(-1j * PHASES))
    spots = r[n_grat:n_grat + 2 * len(axes) * len(SPOT_SIGMAS)].reshape(
        len(axes), len(SPOT_SIGMAS), 2, -1)
    uni = r[n_grat + spots[..., 0].size:-1].reshape(len(axes), 2, -1)
    grey = r[-1]
    tunings = [_channel_tuning(z[..., c], spots[..., c] - grey[c], uni[..., c], axes)
               for c in range(r.shape[1])]
    for t, g, w in zip(tunings, grey, _windows(model, layer, tunings, in_channels)):
        t.update(rest=float(g), window=w)
    return tunings


def _windows(model: Any, layer: str, tunings: list[dict[str, Any]],
             in_channels: int) -> list[float]:
    """Receptive-field width: the smallest aperture through which the preferred grating drives
    the channel to 90% of its full-field amplitude."""
    y, x = _coords(STIM)
    radius = np.sqrt(x**2 + y**2)
    stims = []
    for t in tunings:
        v = across(t["angle"], STIM)
        for ap in APERTURES:
            for p in PHASES:
                pattern = np.cos(2 * np.pi * t["frequency"] * v + p) * (radius <= ap)
                stims.append(_colour(pattern, axis_rgb(t["axis"])))
    batch = np.stack(stims)
    if in_channels == 1:
        batch = batch.mean(axis=1, keepdims=True)
    r = centre_responses(model, layer, batch)
    out = []
    for c in range(len(tunings)):
        rc = r[c * len(APERTURES) * len(PHASES):(c + 1) * len(APERTURES) * len(PHASES), c]
        amp = np.abs(rc.reshape(len(APERTURES), len(PHASES)) @ np.exp(-1j * PHASES))
        ok = np.nonzero(amp >= 0.9 * amp.max())[0] if amp.max() > 0 else [len(APERTURES) - 1]
        out.append(2 * APERTURES[int(ok[0])])
    return out


def _channel_tuning(z: np.ndarray, spots: np.ndarray, uni: np.ndarray,
                    axes: list[str]) -> dict[str, Any]:
    amp = np.abs(z)
    xi, ai, fi = np.unravel_index(int(amp.argmax()), amp.shape)
    best = float(amp[xi, ai, fi])
    a2 = amp[xi, :, fi] ** 2
    vec = (a2 * np.exp(2j * np.deg2rad(ANGLES))).sum()
    angle = float(np.rad2deg(np.angle(vec)) / 2) % 180
    phase = float(-np.angle(z[xi, ai, fi]))
    si = np.unravel_index(int(np.abs(spots).argmax()), spots.shape)
    dc = (uni[:, 0] - uni[:, 1]) / 2
    di = int(np.abs(dc).argmax())
    return {"axis": axes[xi], "angle": round(angle, 2), "frequency": float(FREQS[fi]),
            "phase": round(phase, 4), "amplitude": best,
            "orientation_selectivity": float(abs(vec) / max(a2.sum(), 1e-12)),
            "spot": {"axis": axes[si[0]], "sigma": SPOT_SIGMAS[si[1]],
                     "sign": 1 if si[2] == 0 else -1, "response": float(abs(spots[si]))},
            "dc": {"axis": axes[di], "value": float(dc[di]),
                   "ratio": float(dc[di] / best) if best > 0 else 0.0}}


def _side(vx: float, vy_down: float) -> str:
    deg = math.degrees(math.atan2(-vy_down, vx))
    key = int(round(deg / 45) * 45)
    return words()["sides"][str(180 if key == -180 else key)]


def describe(t: dict[str, Any]) -> str:
    """One sentence from a channel's tuning."""
    w = words()
    tpl = w["templates"]
    if t["amplitude"] < 1e-6 and t["spot"]["response"] < 1e-6:
        return tpl["flat"]
    spot = t["spot"]
    if spot["response"] > 1.1 * t["amplitude"] and t["orientation_selectivity"] < 0.5:
        pos, neg = w["axes"][spot["axis"]]["poles"][:: spot["sign"]]
        text = tpl["spot"].format(pos=pos, neg=neg, width=f"{2.355 * spot['sigma']:.0f}")
        base = spot["response"]
    elif t["frequency"] == FREQS[0] and abs(t["dc"]["value"]) >= 0.7 * t["amplitude"]:
        # Best driven by the coarsest grating and nearly as much by a uniform field: a
        # detector of uniform colour or brightness, not of a pattern.
        pole = w["axes"][t["dc"]["axis"]]["poles"][0 if t["dc"]["value"] > 0 else 1]
        text = tpl["uniform"].format(pole=pole)
        base = abs(t["dc"]["value"])
        text += tpl["window"].format(window=f"{t.get('window', 2 * APERTURES[-1]):.0f}")
        return _rest_clause(text, t, base)
    else:
        pos, neg = w["axes"][t["axis"]]["poles"]
        angle, phase, f = t["angle"], t["phase"], t["frequency"]
        names = w["orientations"]
        fields = {"orientation": names[int(round(angle / 22.5)) % len(names)],
                  "angle": f"{angle:.0f}",
                  "scale": next(n for lo, n in w["scales"] if f >= lo),
                  "period": f"{1 / f:.1f}"}
        if abs(math.sin(phase)) > abs(math.cos(phase)):  # odd symmetric: an edge
            s = -1.0 if math.sin(phase) > 0 else 1.0  # pos pole towards +s * (sin a, cos a)
            a = math.radians(angle)
            vx, vy = s * math.sin(a), s * math.cos(a)
            text = tpl["edge"].format(pos=pos, neg=neg, pos_side=_side(vx, vy),
                                      neg_side=_side(-vx, -vy), **fields)
        else:
            if math.cos(phase) < 0:
                pos, neg = neg, pos
            text = tpl["bar"].format(pos=pos, neg=neg, **fields)
        base = t["amplitude"]
    text += tpl["window"].format(window=f"{t.get('window', 2 * APERTURES[-1]):.0f}")
    dc = t["dc"]
    ratio = dc["value"] / base if base > 0 else 0.0
    strength = next((n for lo, n in w["strengths"] if abs(ratio) >= lo), None)
    if strength:
        pole = w["axes"][dc["axis"]]["poles"][0 if ratio > 0 else 1]
        text += tpl["dc"].format(strength=strength, pole=pole, pct=f"{100 * abs(ratio):.0f}")
    return _rest_clause(text, t, base)


def _rest_clause(text: str, t: dict[str, Any], base: float) -> str:
    w = words()
    if "rest" in t and base > 0:
        rest = t["rest"] / base
        text += w["templates"]["rest"].format(
            level=next(n for hi, n in w["rest_levels"] if rest <= hi), pct=f"{100 * rest:.0f}")
    return text


def _pole(word: str) -> np.ndarray:
    """The RGB direction of a pole word (``light``, ``cyan``, ...)."""
    for name, ax in words()["axes"].items():
        if word in ax["poles"]:
            return axis_rgb(name) * (1 if ax["poles"][0] == word else -1)
    raise ValueError(f"unknown colour pole {word!r}")


def _side_vector(side: str) -> np.ndarray:
    deg = next(float(k) for k, v in words()["sides"].items() if v == side)
    return np.array([math.cos(math.radians(deg)), -math.sin(math.radians(deg))])  # x, y down


def _envelope(sigma: float, size: int) -> np.ndarray:
    y, x = _coords(size)
    return np.exp(-(x**2 + y**2) / (2 * sigma**2))


def kernel_from_description(text: str) -> tuple[np.ndarray, float]:
    """The filter [3, k, k] a sentence describes and its response on mid-grey, read from its
    words alone (the filter applies to images minus mid-grey)."""
    w = words()
    if text.startswith(w["templates"]["flat"].split(":")[0]):
        return np.zeros((3, 1, 1)), 0.0
    m_win = re.search(r"within a window about ([\d.]+) pixels wide", text)
    window = float(m_win.group(1)) if m_win else 9.0
    m_spot = re.search(r"(\w+) spots on a (\w+) surround, about ([\d.]+) pixels wide", text)
    m_uni = re.match(r"(\w+) areas, uniform or coarsely patterned", text)
    if m_uni:
        sigma = window / 3
        size = 2 * max(1, int(window // 2)) + 1
        env = _envelope(sigma, size)
        k, ref = _pole(m_uni.group(1))[:, None, None] * (env / env.sum())[None], 1.0
    elif m_spot:
        sigma = max(float(m_spot.group(3)) / 2.355, 0.5)
        size = 2 * math.ceil(3 * sigma) + 1
        c, s = _envelope(sigma, size), _envelope(2 * sigma, size)
        spatial = c / c.sum() - s / s.sum()
        colour = _pole(m_spot.group(1))
        ref = float(np.abs(spatial).sum() / 2)
    else:
        angle = float(re.search(r"about (-?[\d.]+)°", text).group(1))
        f = 1 / float(re.search(r"period about ([\d.]+) pixels", text).group(1))
        sigma = float(np.clip(min(0.45 / f, window / 3), 0.7, 5.0))
        size = 2 * max(1, min(math.ceil(2.5 * sigma), int(window // 2))) + 1
        v, env = across(angle, size), _envelope(sigma, size)
        edge = re.search(r"(\w+) on the ([\w ]+?) side and (\w+) on the ([\w ]+?) side", text)
        if edge:
            a = math.radians(angle)
            s = float(np.sign(_side_vector(edge.group(4)) @ [math.sin(a), math.cos(a)]) or 1)
            spatial = s * np.sin(2 * np.pi * f * v) * env
            colour = _pole(edge.group(3))
        else:
            bar = re.search(r"(\w+) bars on a (\w+) background", text)
            spatial = np.cos(2 * np.pi * f * v) * env
            spatial -= env * spatial.sum() / env.sum()  # no response to uniform fields
            colour = _pole(bar.group(1))
        ref = float(abs((spatial * np.exp(2j * np.pi * f * v)).sum()))
    if not m_uni:
        k = colour[:, None, None] * spatial[None]
    m_dc = re.search(r"and (\w+) to uniform (\w+) areas(?: \(about (\d+)%)?", text)
    if m_dc:
        env = _envelope(sigma, k.shape[1])
        ratio = (float(m_dc.group(3)) / 100 if m_dc.group(3)
                 else w["strength_values"][m_dc.group(1)])
        dc = ratio * ref * env / env.sum()
        k = k + _pole(m_dc.group(2))[:, None, None] * dc[None]
    m_rest = re.search(r"on mid-grey it rests ([\w ]+?)(?: \(at about (-?\d+)%.*)?$", text)
    rest = 0.0
    if m_rest:
        rest = (float(m_rest.group(2)) / 100 if m_rest.group(2)
                else w["rest_values"][m_rest.group(1)]) * ref / 2
    return k, rest


def simulate_maps(text: str, images: np.ndarray, grid: int, batch: int = 512) -> np.ndarray:
    """Predicted response maps [N, grid, grid] of the described channel (rectified, pooled)."""
    import torch
    import torch.nn.functional as F

    k, rest = kernel_from_description(text)
    if images.shape[1] == 1:
        k = k.sum(axis=0, keepdims=True)
    kt = torch.from_numpy(k[None].astype(np.float32))
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            # Zero padding, as a conv layer's: the image is surrounded by black.
            x = F.pad(torch.from_numpy(images[i:i + batch].astype(np.float32)),
                      [k.shape[1] // 2] * 4) - 0.5
            y = torch.relu(F.conv2d(x, kt) + rest)
            out.append(F.adaptive_avg_pool2d(y, grid)[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros((0, grid, grid), np.float32)


def heldout_stimuli(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Random gratings, step edges and spots (n each), off the tuning grid."""
    rng = np.random.default_rng([seed, 7])
    axes = list(words()["axes"])
    y, x = _coords(size)
    out = []
    for kind in ("grating", "edge", "spot"):
        for _ in range(n):
            ax = axis_rgb(axes[rng.integers(len(axes))])
            oy, ox = rng.uniform(-8, 8, 2)
            v = across(float(rng.uniform(0, 180)), size) + rng.uniform(-8, 8)
            if kind == "grating":
                pat = np.cos(2 * np.pi * rng.uniform(0.04, 0.4) * v + rng.uniform(0, 2 * np.pi))
            elif kind == "edge":
                pat = np.tanh(v / rng.uniform(0.3, 2.0))
            else:
                s = rng.uniform(0.8, 5.0)
                pat = rng.choice([-1, 1]) * np.exp(-((x - ox) ** 2 + (y - oy) ** 2) / (2 * s * s))
            out.append(_colour(pat, ax, float(rng.uniform(0.25, 0.5))))
    return np.stack(out).astype(np.float32)


def image_pool(n_stimuli: int, n_primitives: int, n_digits: int,
               seed: int) -> tuple[np.ndarray, list[str]]:
    """Held-out stimuli, primitives (test split) and digits (test split), with their source."""
    from neuroscribe.vision.data import digits, primitives

    stim = heldout_stimuli(n_stimuli, seed)
    prim, _ = primitives(n_primitives, seed + 100, "test")
    dig, _ = digits("test", limit=n_digits)
    sources = ["stimuli"] * len(stim) + ["primitives"] * len(prim) + ["digits"] * len(dig)
    return np.concatenate([stim, prim, dig]), sources


def save_png(path: Any, img: np.ndarray) -> None:
    import matplotlib.image

    from neuroscribe.runs import atomic_path

    with atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, np.clip(np.moveaxis(img, 0, -1), 0, 1), format="png")


def heat_overlay(image: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The image in grey with a channel's map (0..1, any grid) laid over it in colour."""
    import matplotlib

    size = image.shape[-1]
    rep = -(-size // level.shape[-1])
    up = np.kron(np.clip(level, 0, 1), np.ones((rep, rep)))[:size, :size]
    heat = matplotlib.colormaps["inferno"](up)
    grey = image.mean(axis=0)[None]
    return 0.35 * grey + 0.65 * np.moveaxis(heat[..., :3], -1, 0)


def filter_grid(weights: np.ndarray, sentences: list[str], scores: list[float | None],
                path: Any, cols: int = 4) -> None:
    """A PNG of the first-layer filters (grey = 0), each with its sentence and score."""
    import textwrap

    from neuroscribe.vision.data import figure_grid, save_figure

    fig, cells = figure_grid(len(weights), cols, 3.3)
    for c, (ax, w, text, score) in enumerate(zip(cells, weights, sentences, scores)):
        img = 0.5 + w / (2 * max(float(np.abs(w).max()), 1e-9))
        ax.imshow(np.moveaxis(img, 0, -1) if img.shape[0] == 3 else img[0], cmap="gray",
                  interpolation="nearest", vmin=0, vmax=1)
        head = f"#{c}  score {score:.2f}" if score is not None else f"#{c}  score n/a"
        ax.set_title(head + "\n" + "\n".join(textwrap.wrap(text, 46)), fontsize=6.5,
                     loc="left")
    save_figure(fig, path)
