"""Streaming per-unit statistics: a vectorised top-k of contexts and its keys (the moments:
``record.moments``).

The top-k takes one group of batches at a time and keeps memory bounded by units x k, never
by corpus length: it touches [units, k + batch]-sized keys and copies only the rows of the
contexts that enter it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

QUANTILES = (0.0, 0.5, 0.9, 0.99, 0.999)  # OpenAI's bins: 0-0.5, 0.5-0.9, 0.9-0.99, 0.99-0.999
BIN_STREAM = "quantile-bins"  # the quantile bins' keys: a stream of the seed of their own


EMPTY = -(2**63)  # the key of "not a candidate" (e.g. a context outside a quantile bin)
VACANT = EMPTY + 1  # a slot never filled: below every real key, above EMPTY, so that a
# candidate keyed EMPTY never takes a slot
M32 = 0xFFFFFFFF


def _mix32(x: Any) -> Any:
    """A 32-bit integer hash (xor-shift-multiply) of int64 values in [0, 2**32)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def stream_seed(seed: int, stream: str) -> int:
    """A 32-bit seed for one named stream of a seed (the random sample's, the bins')."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:4], "little")


def with_ctx(k32: Any, ctx: Any) -> Any:
    """Unique int64 keys from 32-bit keys [B, U] (int64 in [-2**31, 2**31)) and the contexts'
    global ids [B]: ties go to the smaller context id, so a top-k by key is one exact set,
    whatever order or split the contexts come in."""
    if len(ctx) and int(ctx.max()) > M32:
        raise ValueError("context ids must fit in 32 bits")
    return k32 * (M32 + 1) + (M32 - ctx)[:, None]


def float_keys(x: Any, ctx: Any) -> Any:
    """Keys [B, U] ordered as the float32 values x [B, U] (NaN excluded), ties by context."""
    import torch

    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return with_ctx(torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF), ctx)


def random_keys(seed32: int, ctx: Any, n_units: int) -> Any:
    """Random keys [B, U], a pure function of (seed, global context id, unit): a sample drawn
    by them does not depend on how the contexts are batched, ordered or split across ranks."""
    import torch

    c = _mix32((ctx.to(torch.int64) & M32) ^ seed32)
    u = _mix32(((torch.arange(n_units, dtype=torch.int64) + 1) * 0x9E3779B1 & M32) ^ 0x85EBCA6B)
    h = _mix32(_mix32(c[:, None] ^ u[None, :]) ^ seed32)
    return with_ctx(h - (1 << 31), ctx)


@dataclass
class Part:
    """One batch of activations [B, T, U], and the same as [B, U, T] (contiguous) where the
    caller made it: a batch where most slots change copies rows from that instead of
    gathering strided columns. ``counted``: in the histogram already."""

    acts: Any
    acts_t: Any = None
    counted: bool = False


def gather_rows(parts: list[Part], b: Any, u: Any) -> Any:
    """float32 [n, T]: the activations of context b[i], unit u[i], where b numbers the
    contexts of the parts in order."""
    import torch

    if len(parts) == 1:
        return _rows(parts[0], b, u)
    sizes = torch.tensor([len(p.acts) for p in parts])
    which = torch.bucketize(b, sizes.cumsum(0), right=True)
    starts = sizes.cumsum(0) - sizes
    out = torch.empty((len(b), parts[0].acts.shape[1]), dtype=torch.float32)
    for i in which.unique().tolist():
        sel = (which == i).nonzero().squeeze(1)
        out[sel] = _rows(parts[i], b[sel] - starts[i], u[sel])
    return out


def _rows(p: Part, b: Any, u: Any) -> Any:
    if p.acts_t is not None:
        n_units, ctx_len = p.acts_t.shape[1:]
        return p.acts_t.view(-1, ctx_len).index_select(0, b * n_units + u).float()
    return p.acts[b, :, u].float()  # the one strided gather


class TopK:
    """Per-unit streaming top-k of contexts by an int64 key, with their tokens and activations.

    Keys are unique per unit (``with_ctx``), so the kept set is exact and independent of the
    order the contexts arrive in; ``state`` and ``merge_states`` combine stores that saw
    different contexts into the store that would have seen them all.

    Slots are overwritten in place: a batch only writes the (unit, slot) pairs whose context
    entered the top-k, so the cost per batch is a top-k over [units, k + batch] keys, and only
    for the units where some new key beats the current k-th best.

    ``groups`` > 1 keeps that many independent top-ks per unit in one store (row ``g * units +
    u`` is group g of unit u), so that e.g. all quantile bins share one top-k call per batch.

    Tokens belong to a context, not to a unit: each batch's tokens are kept once, in a bank
    that slots point into (``src``), and the bank is pruned to the contexts still in a slot
    whenever it has doubled, so its memory is bounded by units x k too.
    """

    BANK_MIN = 4096  # bank rows (contexts) below which the bank is never pruned

    def __init__(self, n_units: int, k: int, ctx_len: int, groups: int = 1) -> None:
        import torch

        rows = n_units * groups
        self.n_units, self.k, self.groups, self.ctx_len = n_units, k, groups, ctx_len
        self.keys = torch.full((rows, k), VACANT, dtype=torch.int64)
        self.ctx = torch.full((rows, k), -1, dtype=torch.int64)
        self.acts = torch.zeros((rows, k, ctx_len))
        self.src = torch.full((rows, k), -1, dtype=torch.int64)  # bank row of each slot
        self.bank: list[Any] = []  # token batches [B, T] (int32), rows numbered in order
        self.bank_rows, self.prune_at = 0, self.BANK_MIN

    def update(self, keys: Any, acts: Any, tokens: Any, ctx: Any) -> None:
        """keys [B, U], acts [B, T, U] (or a list of ``Part``), tokens [B, T], ctx [B] (one
        group)."""
        self.update_rows(keys.T, acts, tokens, ctx)

    def update_rows(self, keys: Any, acts: Any, tokens: Any, ctx: Any) -> None:
        """keys [rows, B]: row ``g * U + u`` keys the batch's contexts for group g, unit u
        (``EMPTY``: not a candidate). acts: [B, T, U], or the batch's ``Part``s in order."""
        import torch

        if self.k == 0:
            return
        # A row whose new keys all fall below its current k-th best keeps its top-k exactly.
        cand = (keys > self.keys.amin(1, keepdim=True)).any(1)
        rows = cand.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        if rows.numel() == len(cand):
            merged = torch.cat([self.keys, keys], dim=1)
        else:
            merged = torch.cat([self.keys[rows], keys[rows]], dim=1)
        keep = torch.zeros_like(merged, dtype=torch.bool)
        # Unsorted is the same set: the sort only orders the k kept (nth_element, then sort).
        keep.scatter_(1, merged.topk(self.k, dim=1, sorted=False).indices, True)
        new_r, new_b = keep[:, self.k:].nonzero(as_tuple=True)
        if new_r.numel() == 0:
            return
        # Vacated slots and incoming contexts come out grouped by row with equal counts.
        vac_r, vac_k = (~keep[:, : self.k]).nonzero(as_tuple=True)
        new_r = rows[new_r]
        slot = rows[vac_r] * self.k + vac_k  # flat index into [rows * k]
        self.keys.view(-1)[slot] = keys[new_r, new_b]
        self.ctx.view(-1)[slot] = ctx[new_b]
        self.src.view(-1)[slot] = new_b + self.bank_rows
        self.bank.append(tokens.to(torch.int32, copy=True))
        self.bank_rows += len(tokens)
        parts = acts if isinstance(acts, list) else [Part(acts)]
        new_acts = gather_rows(parts, new_b, new_r % self.n_units)
        self.acts.view(-1, self.ctx_len).index_copy_(0, slot, new_acts)
        if self.bank_rows > self.prune_at:
            self._prune_bank()

    def _prune_bank(self) -> None:
        import torch

        used = self.src[self.src >= 0].unique()  # sorted
        self.bank = [torch.cat(self.bank).index_select(0, used)]
        self.bank_rows, self.prune_at = len(used), max(self.BANK_MIN, 2 * len(used))
        self.src = torch.where(self.src >= 0, torch.searchsorted(used, self.src), -1)

    def state(self, copy: bool = True) -> dict[str, Any]:
        """The store as plain tensors (keys, ctx, acts, tokens per slot; empty slots zeroed),
        for ``merge_states``. ``copy=False``: the store's own tensors where no slot is empty,
        for a merge that reads them at once (``merge_states`` copies what it keeps)."""
        import torch

        table = torch.cat([torch.zeros((1, self.ctx_len), dtype=torch.int32), *self.bank])
        empty = self.keys <= VACANT
        tokens = table.index_select(0, self.src.reshape(-1) + 1).view(*self.keys.shape,
                                                                       self.ctx_len)
        if not copy and not empty.any():
            return {"keys": self.keys, "ctx": self.ctx, "acts": self.acts, "tokens": tokens}
        return {"keys": self.keys.masked_fill(empty, EMPTY), "ctx": self.ctx.masked_fill(empty, -1),
                "acts": self.acts.masked_fill(empty[..., None], 0.0),
                "tokens": tokens.masked_fill(empty[..., None], 0)}


    def finished(self, *prefixes: str) -> dict[str, Any]:
        """Slots sorted best first; empty slots have ctx -1. One prefix per group."""
        if len(prefixes) != self.groups:
            raise ValueError(f"need {self.groups} prefixes, got {len(prefixes)}")
        return split_groups(merge_states([self.state()], self.k), self.n_units, *prefixes)


def merge_states(states: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """The ``TopK.state`` of the store that saw every context the given stores saw, sorted
    best first (empty slots last, zeroed)."""
    return gather_slots(*merge_order(states, k))


def merge_order(states: list[dict[str, Any]], k: int) -> tuple[dict[str, Any], Any]:
    """The given states side by side, and each row's best k slots among them, best first
    (``gather_slots`` takes them: the big tensors are copied once)."""
    import torch

    cat = {name: states[0][name] if len(states) == 1 else
           torch.cat([s[name] for s in states], dim=1) for name in states[0]}
    best = cat["keys"].topk(min(k, cat["keys"].shape[1]), dim=1).indices
    return cat, best.gather(1, cat["keys"].gather(1, best).argsort(dim=1, descending=True))


def gather_slots(cat: dict[str, Any], order: Any) -> dict[str, Any]:
    """The slots ``order`` [rows, j] picks from each tensor of a state; empty ones get ctx -1."""
    out = {}
    for name, t in cat.items():
        out[name] = take_slots(t, order) if t.dim() == 3 else t.gather(1, order)
    empty = out["keys"] == EMPTY  # several empty slots: which ones is immaterial, all zero
    out["ctx"] = out["ctx"].masked_fill(empty, -1)
    return out


def split_groups(state: dict[str, Any], n_units: int, *prefixes: str) -> dict[str, Any]:
    """Records ``{prefix}_ctx``, ``_acts``, ``_tokens`` per group of a merged state."""
    out = {}
    for g, prefix in enumerate(prefixes):
        rows = slice(g * n_units, (g + 1) * n_units)
        out.update({f"{prefix}_ctx": state["ctx"][rows], f"{prefix}_acts": state["acts"][rows],
                    f"{prefix}_tokens": state["tokens"][rows]})
    return out


def take_slots(t: Any, order: Any) -> Any:
    """t [rows, k, T] with each row's slots picked by order [rows, j]: a fast row copy."""
    import torch

    n_rows, k, *rest = t.shape
    flat = (order + torch.arange(n_rows)[:, None] * k).reshape(-1)
    return t.reshape(n_rows * k, *rest).index_select(0, flat).view(n_rows, order.shape[1], *rest)


def scratch(bufs: dict[str, Any], name: str, shape: Any, dtype: Any) -> Any:
    """A reusable buffer of the given shape: a view of one flat tensor per name, regrown only
    when too small (a fresh large allocation costs a page fault per 4 KiB on every batch)."""
    import torch

    n = math.prod(shape)
    buf = bufs.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = bufs[name] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def quantiles(x: Any, qs: tuple[float, ...]) -> Any:
    """``torch.quantile(x.double(), qs, dim=1).T`` (linear interpolation) of x [R, N], the
    same values: rows sorted in x's own dtype (converting is exact and keeps the order), the
    two neighbours of each quantile interpolated in float64."""
    import torch

    n = x.shape[1]
    v = x.sort(dim=1).values
    pos = torch.tensor(qs, dtype=torch.float64) * (n - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    a, b = v[:, lo].double(), v[:, hi].double()
    return torch.lerp(a, b, (pos - lo).expand_as(a))


def bin_keys(boundaries: Any, ctx_max: Any, keys: Any) -> Any:
    """Keys [bins * U, B] for a grouped ``TopK`` (row ``g * U + u``): each context's key in
    the row of its bin, ``EMPTY`` in the others.

    boundaries [U, bins + 1], ctx_max [B, U], keys [B, U]. Bin g is [b_g, b_g+1), except that
    the first is open below and the last open above, so that every context lands in exactly
    one bin, however far outside the range the boundaries were fixed on it falls.
    """
    import torch

    b = boundaries.T[:, :, None].clone()  # [bins + 1, U, 1]
    b[0], b[-1] = -math.inf, math.inf
    cm = ctx_max.T  # [U, B]
    inside = (cm >= b[:-1]) & (cm < b[1:])  # [bins, U, B]
    return torch.where(inside, keys.T, EMPTY).reshape(-1, cm.shape[1])
