"""What calling a numeric function again on the same inputs tells the offline agent.

FIND's functions come in three variants, and a second call tells them apart before any fit:

- **deterministic** (clean): every value comes back the same;
- **noised**: noise drawn per call, at every input. Averaging repeated calls removes it. Noise
  with integer steps (FIND's Poisson noise) has a mean, which equals its variance, so that
  estimate is subtracted;
- **corrupted**: values change only inside one region (FIND returns fresh normal noise
  there). The region is where they change, its ends refined by calling f between the last
  steady and the first changing input; the function is fitted outside it only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Call = Callable[[np.ndarray], np.ndarray]
NOISE_EVERYWHERE = 0.97  # FIND's one-sided corruptions end at |a| <= 100: >= 11% stays clean


def caller(box: Any) -> Call:
    """``box`` as floats in, floats out (NaN where f gave no number)."""
    def call(xs: np.ndarray) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in box([float(v) for v in xs])],
                        float)
    return call


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per input, whether two calls disagree (beyond rounding, or finite against not)."""
    both = np.isfinite(a) & np.isfinite(b)
    return np.where(both, np.abs(a - b) > 1e-9 * (1 + np.abs(a)), np.isfinite(a) != np.isfinite(b))


@dataclass(frozen=True)
class Repeated:
    """Observations after calling f again: inputs ``x`` and ``y`` (averaged where f is noisy,
    with the noise mean removed; NaN where they are not part of the function), the kind of
    behaviour seen, and where relevant the noise's size or the corrupted region (lo, hi, mean
    value there)."""

    kind: str  # deterministic, noise, integer_noise, region
    x: np.ndarray
    y: np.ndarray
    sd: float = 0.0  # of one call's noise; integer noise's mean (subtracted) is sd ** 2
    region: tuple[float, float, float] | None = None

    def describe(self) -> str:
        if self.kind == "noise":
            return f"; plus noise drawn at every call (sd about {self.sd:.2g})"
        if self.kind == "integer_noise":
            return (f"; plus integer-valued noise drawn at every call (Poisson-like: mean "
                    f"about {self.sd ** 2:.2g}, equal to its variance)")
        return ""


def integer_steps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two calls differ, and only ever by whole numbers."""
    both = np.isfinite(a) & np.isfinite(b)
    d, tol = (a - b)[both], 1e-6 * (1 + np.abs(a[both]))
    return bool((np.abs(d) > tol).any() and (np.abs(d - np.round(d)) <= tol).all())


def gap_inputs(x: np.ndarray, y: np.ndarray, gaps: int = 8, n: int = 12) -> np.ndarray:
    """``n`` inputs inside each of the ``gaps`` largest jumps of ``y`` between neighbouring
    finite points: where the ends of rectangles, steps and regions lie."""
    ok = np.isfinite(y)
    xo, yo = x[ok], y[ok]
    if len(xo) < 2:
        return np.zeros(0)
    idx = np.argsort(np.abs(np.diff(yo)))[::-1][:gaps]
    return np.concatenate([np.linspace(xo[i], xo[i + 1], n + 2)[1:-1] for i in idx])


def average(call: Call, x: np.ndarray, first: list[np.ndarray], n_calls: int) -> np.ndarray:
    """``n_calls`` calls at ``x`` (``first`` are already made), stacked (n_calls, n)."""
    more = [call(x) for _ in range(n_calls - len(first))]
    return np.stack(first + more)


def mean_of(ys: np.ndarray) -> tuple[np.ndarray, float]:
    """The mean over calls at each input, and the noise variance pooled over inputs."""
    with warnings.catch_warnings():  # an input where f never gives a number stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(ys, axis=0), float(np.nanmean(np.nanvar(ys, axis=0, ddof=1)))


def densified(call: Call, x: np.ndarray, mean: np.ndarray, n_calls: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """``gap_inputs`` of the averaged function, each averaged over ``n_calls`` calls too,
    merged in order: the first probe placed its extra inputs at the jumps of one noisy call,
    which are mostly the noise's."""
    more = gap_inputs(x, mean)
    if not len(more):
        return x, mean
    extra, _ = mean_of(average(call, more, [], n_calls))
    xs, ys = np.concatenate([x, more]), np.concatenate([mean, extra])
    order = np.argsort(xs, kind="stable")
    return xs[order], ys[order]


def region_ends(call: Call, x: np.ndarray, moved: np.ndarray, n: int = 12, rounds: int = 2
                ) -> tuple[float, float]:
    """The changing region's ends, each narrowed ``rounds`` times: f is called twice at ``n``
    inputs between the last steady input and the first changing one."""
    idx = np.flatnonzero(moved)
    ends = []
    for end, out in ((idx[0], idx[0] - 1), (idx[-1], idx[-1] + 1)):
        inside = float(x[end])
        steady = float(x[out]) if 0 <= out < len(x) else None
        for _ in range(rounds if steady is not None else 0):
            between = np.linspace(steady, inside, n + 2)[1:-1]
            now = changed(call(between), call(between))
            if now.any():  # the first changing input from the steady side, and its neighbour
                k = int(np.flatnonzero(now)[0])
                inside, steady = float(between[k]), float(between[k - 1]) if k else steady
            else:
                steady = float(between[-1])
        ends.append(inside)
    return ends[0], ends[1]


def repeat(call: Call, x: np.ndarray, y: np.ndarray, n_calls: int | None = None,
           target_se: float = 0.04, most: int = 1024) -> Repeated:
    """Call f again at ``x`` and read what changed (see the module's docstring). Where f is
    noisy everywhere, it is called ``n_calls`` times in all; by default as often as brings
    the noise's standard error at each input to ``target_se`` (at least 64, at most
    ``most`` calls: 4 ms each for 600 inputs of a FIND function here)."""
    again = call(x)
    moved = changed(y, again)
    finite = np.isfinite(y) & np.isfinite(again)
    if not moved.any():
        return Repeated("deterministic", x, y)
    integer = integer_steps(y, again)
    if integer or moved[finite].mean() >= NOISE_EVERYWHERE:
        sd2 = float(np.nanmean((y - again) ** 2)) / 2  # each call's noise variance
        n = n_calls or int(np.clip(np.ceil(sd2 / target_se ** 2), 64, most))
        mean, var = mean_of(average(call, x, [y, again], n))
        xs, mean = densified(call, x, mean, n)
        if integer:
            return Repeated("integer_noise", xs, mean - var, np.sqrt(var))
        return Repeated("noise", xs, mean, np.sqrt(var))
    lo, hi = region_ends(call, x, moved)
    inside = (x >= lo) & (x <= hi)
    out = y.copy()
    out[inside] = np.nan  # not part of the function: left out of every fit
    return Repeated("region", x, out, region=(lo, hi, float(np.nanmean(y[inside]))))
