"""The op families that ``find_fit`` searches: FIND's 16 numeric families and its compound
parts (ceil, floor), each as candidate basis columns whose amplitudes and offset are linear.

A family gives, for points ``x`` (and, for a *searched* family, the observed ``y``), an array
(T, k, n): T candidates of its nonlinear parameters, k basis columns each, and per candidate
the k expressions of the columns. Fixed families depend on ``x`` only. Searched families
(sines, square waves, gaussians, tanh, rectangles, rationals) scan a coarse grid against
``y``, then refine around the best candidates, since FIND's parameters span frequencies up
to 63 rad per unit and widths down to one unit, where a fixed grid fine enough everywhere
would not fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

Columns = tuple[np.ndarray, list[list[str]]]
TWO_PI = 2 * np.pi


def _f(v: float) -> str:
    return f"{float(v):.8g}"


def sse_all(vals: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares SSE (with an intercept) of every candidate of ``vals`` (T, k, n)."""
    yc = y - y.mean()
    if vals.shape[1] == 0:
        return np.full(vals.shape[0], float(yc @ yc))
    vc = vals - vals.mean(-1, keepdims=True)
    a = vc @ vc.transpose(0, 2, 1)
    eye = np.eye(vals.shape[1])
    a = a + (1e-9 * np.einsum("tkk->tk", a)[:, :, None] + 1e-12) * eye
    b = vc @ yc
    coef = np.linalg.solve(a, b[..., None])[..., 0]
    sse = yc @ yc - (coef * b).sum(-1)
    return np.where(np.isfinite(sse), sse, np.inf)


def _best(make: Callable[[np.ndarray], np.ndarray], params: np.ndarray, y: np.ndarray,
          k: int, chunk: int = 2048) -> np.ndarray:
    """The ``k`` rows of ``params`` whose columns ``make(rows)`` fit ``y`` best."""
    sse = np.concatenate([sse_all(make(params[i:i + chunk]), y)
                          for i in range(0, len(params), chunk)])
    return params[np.argsort(sse)[:k]]


def _refined(make: Callable[[np.ndarray], np.ndarray], coarse: np.ndarray, y: np.ndarray,
             half: float, step: float, ratios: tuple[float, float]) -> np.ndarray:
    """The best (location, scale) row: the 3 best of ``coarse``, each refined on a fine grid
    (location within +-``half`` by ``step``, scale times 21 ratios in ``ratios``)."""
    fine = [np.stack(np.meshgrid(np.arange(a - half, a + half, step),
                                 b * np.geomspace(*ratios, 21)), -1).reshape(-1, 2)
            for a, b in _best(make, coarse, y, 3)]
    return _best(make, np.concatenate(fine), y, 1)


def _grid(x: np.ndarray, b: np.ndarray, col: Callable[[np.ndarray, np.ndarray], np.ndarray],
          expr: Callable[[float], str]) -> Columns:
    return col(b[:, None], x[None, :])[:, None, :], [[expr(v)] for v in b]


def fixed(name: str, x: np.ndarray) -> Columns:
    cols = {"constant": [], "linear": [(x, "x")],
            "polynomial": [((x / 128) ** k, f"(x / 128) ** {k}") for k in range(1, 6)],
            "root": [(np.sqrt(np.abs(x)), "math.sqrt(abs(x))")],
            "logarithm": [(np.log(np.abs(x) + 1e-300), "math.log(abs(x))")]}[name]
    arr = np.array([c for c, _ in cols]).reshape(1, len(cols), len(x))
    return arr, [[e for _, e in cols]]


EDGES = np.arange(-128, 128.5, 0.5)
FIXED: dict[str, Callable[[np.ndarray], Columns]] = {
    **{n: (lambda x, n=n: fixed(n, x))
       for n in ("constant", "linear", "polynomial", "root", "logarithm")},
    "absolute": lambda x: _grid(x, EDGES, lambda b, x: np.abs(x - b),
                                lambda b: f"abs(x - {_f(b)})"),
    "relu": lambda x: (np.stack([np.maximum(0, x[None] - EDGES[:, None]),
                                 np.broadcast_to(x, (len(EDGES), len(x)))], 1),
                       [[f"max(0.0, x - {_f(b)})", "x"] for b in EDGES]),
    "step": lambda x: _grid(x, EDGES, lambda b, x: (x > b) * 1.0,
                            lambda b: f"(1.0 if x > {_f(b)} else 0.0)"),
    "reciprocal": lambda x: _grid(x, EDGES, lambda b, x: 1 / (x - b),
                                  lambda b: f"1 / (x - {_f(b)})"),
    "floor": lambda x: _grid(x, np.arange(1, 25, 0.01), lambda s, x: np.floor(x / s),
                             lambda s: f"math.floor(x / {_f(s)})"),
    "ceil": lambda x: _grid(x, np.arange(1, 25, 0.01), lambda s, x: np.ceil(x / s),
                            lambda s: f"math.ceil(x / {_f(s)})"),
}


def _waves(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: np.stack([np.cos(w[:, None] * x), np.sin(w[:, None] * x)], 1)


def _phasors(x: np.ndarray, w: np.ndarray, block: int = 64) -> Iterator[np.ndarray]:
    """e^{i w x} for every ``w``, a chunk of rows at a time. On an evenly spaced ``w`` each
    row is e^{i w0 x} * e^{i j dw x}: one exponential per 64 rows, the rest products."""
    dw = w[1] - w[0] if len(w) > 1 else 0.0
    if len(w) < 2 * block or not np.allclose(np.diff(w), dw, rtol=0, atol=1e-12):
        for i in range(0, len(w), 1024):
            yield np.exp(1j * np.outer(w[i:i + 1024], x))
        return
    step = np.exp(1j * np.outer(np.arange(block) * dw, x))
    starts = np.exp(1j * np.outer(w[::block], x))
    for i in range(0, len(starts), 16):
        rows = (starts[i:i + 16, None, :] * step[None]).reshape(-1, len(x))
        yield rows[:len(w) - i * block]


def wave_sse(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``sse_all`` of the columns cos(w x), sin(w x) for every ``w``, from three sums per
    frequency (as Lomb-Scargle): Z1 = sum e^{iwx}, Z2 = sum e^{2iwx} and Zy = sum y e^{iwx}
    give the 2x2 normal equations in closed form, so no (T, 2, n) array is built."""
    n, yc = len(x), y - y.mean()
    z1, z2, zy = (np.concatenate(z) for z in zip(*(
        (e.sum(1), np.einsum("ij,ij->i", e, e), e @ yc) for e in _phasors(x, w))))
    cc = (n + z2.real) / 2 - z1.real ** 2 / n
    ss = (n - z2.real) / 2 - z1.imag ** 2 / n
    cs = z2.imag / 2 - z1.real * z1.imag / n
    cc, ss = cc * (1 + 1e-9) + 1e-12, ss * (1 + 1e-9) + 1e-12  # sse_all's ridge
    bc, bs = zy.real, zy.imag
    with np.errstate(all="ignore"):
        out = yc @ yc - (ss * bc ** 2 - 2 * cs * bc * bs + cc * bs ** 2) / (cc * ss - cs ** 2)
    return np.where(np.isfinite(out), out, np.inf)


_FREQ: dict[bytes, float] = {}


def frequency(x: np.ndarray, y: np.ndarray) -> float:
    """The w of the best a cos(w x) + b sin(w x): scanned on [0.002, 64] (FIND's sines reach
    2 pi / 0.1 rad per unit; irregular probes keep them from aliasing), then refined. Cached
    for the last few point sets (the sine and the square wave both start from it)."""
    key = x.tobytes() + y.tobytes()
    if key in _FREQ:
        return _FREQ[key]
    grid = np.arange(0.002, 64, 0.002)
    sse = wave_sse(x, y, grid)
    lo = sse.min() + 1e-3 * (np.median(sse) - sse.min())  # aliases of regular probes tie:
    seeds = np.concatenate([grid[np.argsort(sse)[:4]], grid[sse <= lo][:1]])  # keep the lowest
    cands = [np.arange(v - 0.003, v + 0.003, 0.00005) for v in seeds]
    fine = [(c[c > 0], wave_sse(x, y, c[c > 0])) for c in cands]
    top = min(e.min() for _, e in fine)
    tol = top + 1e-3 * (np.median(sse) - top) + 1e-12
    if len(_FREQ) > 16:
        _FREQ.clear()
    _FREQ[key] = float(min(c[np.argmin(e)] for c, e in fine if e.min() <= tol))
    return _FREQ[key]


def cos(x: np.ndarray, y: np.ndarray) -> Columns:
    w = np.array([frequency(x, y)])
    return _waves(x)(w), [[f"math.cos({_f(v)} * x)", f"math.sin({_f(v)} * x)"] for v in w]


def square_wave(x: np.ndarray, y: np.ndarray) -> Columns:
    """sign(sin(w x + p)) near the fundamental frequency of ``y``."""
    w0 = frequency(x, y)
    w, p = np.meshgrid(w0 * np.linspace(0.98, 1.02, 81), np.arange(128) * TWO_PI / 128)
    w, p = w.ravel(), p.ravel()

    def make(rows: np.ndarray) -> np.ndarray:
        return np.where(np.sin(rows[:, :1] * x + rows[:, 1:]) > 0, 1.0, -1.0)[:, None, :]

    best = _best(make, np.stack([w, p], 1), y, 1)
    return make(best), [[f"(1.0 if math.sin({_f(a)} * x + {_f(b)}) > 0 else -1.0)"]
                        for a, b in best]


def gaussian(x: np.ndarray, y: np.ndarray) -> Columns:
    def make(rows: np.ndarray) -> np.ndarray:
        m, s = rows[:, :1], rows[:, 1:]
        return np.exp(-(((x - m) / s) ** 2) / 2)[:, None, :]

    m, s = np.meshgrid(np.arange(-130, 131, 1.0), np.geomspace(0.4, 60, 30))
    best = _refined(make, np.stack([m.ravel(), s.ravel()], 1), y, 1, 0.02, (0.88, 1.14))
    return make(best), [[f"math.exp(-((x - {_f(a)}) / {_f(b)}) ** 2 / 2)"] for a, b in best]


def tanh(x: np.ndarray, y: np.ndarray) -> Columns:
    def make(rows: np.ndarray) -> np.ndarray:
        return np.tanh(rows[:, 1:] * (x - rows[:, :1]))[:, None, :]

    b = np.unique(np.concatenate([np.arange(-128, 129, 1.0), np.arange(-10, 10, 0.1)]))
    bb, ww = np.meshgrid(b, np.geomspace(0.005, 64, 32))
    best = _refined(make, np.stack([bb.ravel(), ww.ravel()], 1), y, 0.5, 0.01, (0.8, 1.25))
    return make(best), [[f"math.tanh({_f(c)} * (x - {_f(a)}))"] for a, c in best]


def jumps(x: np.ndarray, y: np.ndarray, n: int = 24) -> np.ndarray:
    """Midpoints between neighbouring points across the ``n`` largest jumps of ``y``."""
    d = np.abs(np.diff(y))
    idx = np.argsort(d)[::-1][:n]
    return (x[idx] + x[idx + 1]) / 2


def rectangle(x: np.ndarray, y: np.ndarray) -> Columns:
    """1 on [lo, hi]: ends on a coarse grid and at the jumps of ``y``."""
    edges = np.unique(np.concatenate([np.arange(-128, 129, 4.0), jumps(x, y)]))
    lo, hi = np.meshgrid(edges, edges)
    keep = hi > lo
    rows = np.stack([lo[keep], hi[keep]], 1)

    def make(r: np.ndarray) -> np.ndarray:
        return ((x >= r[:, :1]) & (x <= r[:, 1:])).astype(float)[:, None, :]

    best = _best(make, rows, y, 1)
    return make(best), [[f"(1.0 if {_f(a)} <= x <= {_f(b)} else 0.0)"] for a, b in best]


def _rational_fits(t: np.ndarray, y: np.ndarray, dp: int, dq: int, iters: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Coefficients (p, q) of P / Q: the smallest singular vector of [T_p, -y T_q] (columns
    scaled), then ``iters`` Sanathanan-Koerner steps, each with the rows divided by the last
    |Q(t)|, which turns the linear residual P - yQ into nearly the true one, P / Q - y."""
    a = np.concatenate([t[:, None] ** np.arange(dp + 1),
                        -(y[:, None] * t[:, None] ** np.arange(dq + 1))], 1)
    w = np.ones(len(t))
    for _ in range(iters + 1):
        aw = a * w[:, None]
        scale = np.linalg.norm(aw, axis=0) + 1e-300
        try:
            v = np.linalg.svd(aw / scale, full_matrices=False)[2][-1] / scale
        except np.linalg.LinAlgError:
            return
        yield v[:dp + 1], v[dp + 1:]
        with np.errstate(all="ignore"):
            q = np.abs(np.polyval(v[dp + 1:][::-1], t))
        if not np.isfinite(q).all() or q.max() <= 0:
            return
        w = 1 / np.maximum(q, 1e-6 * q.max())


def rational(x: np.ndarray, y: np.ndarray, iters: int = 4) -> Columns:
    """P(x) / Q(x), deg P < deg Q <= 5: for each pair of degrees, the coefficients that
    minimise |P(x) - y Q(x)| on x / 128, refined by reweighting (``_rational_fits``); the
    fit of least squared error, as one column."""
    t = x / 128
    best: tuple[float, np.ndarray, str] | None = None
    for dq in range(1, 6):
        for dp in range(dq):
            for p, q in _rational_fits(t, y, dp, dq, iters):
                with np.errstate(all="ignore"):
                    pred = np.polyval(p[::-1], t) / np.polyval(q[::-1], t)
                err = float(((pred - y) ** 2).sum())
                if np.isfinite(err) and (best is None or err < best[0]):
                    poly = [" + ".join(f"{_f(c)} * (x / 128) ** {k}" for k, c in enumerate(cs))
                            for cs in (p, q)]
                    best = (err, pred, f"({poly[0]}) / ({poly[1]})")
    if best is None:
        return np.zeros((1, 1, len(x))), [["0.0"]]
    return best[1][None, None, :], [[best[2]]]


SEARCHED: dict[str, Callable[[np.ndarray, np.ndarray], Columns]] = {
    "cos": cos, "square_wave": square_wave, "gaussian": gaussian, "tanh": tanh,
    "rectangle": rectangle, "rational": rational}
NONLINEAR = {"cos": 1, "square_wave": 2, "gaussian": 2, "tanh": 2, "rectangle": 2,
             "rational": 4, "absolute": 1, "relu": 1, "step": 1, "reciprocal": 1, "floor": 1,
             "ceil": 1}
NAMES = [*FIXED, *SEARCHED]
# FIND draws the parts of its sums and products from these (and a square wave that its code
# writer turns into a sign, a step at 0), so compounds are searched over them only
COMPOUND_PARTS = [*FIXED, "rectangle"]
