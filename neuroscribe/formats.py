"""The one record type shared by every stage, in OpenAI neuron-explainer's JSON formats.

Every dataclass serialises with a ``dataclass_name`` key, exactly as OpenAI's
``fast_dataclasses`` does, so their public ``NeuronRecord`` and ``NeuronSimulationResults``
files load unchanged and ours load in their code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

SPLITS_TOP = ("train", "calibration", "valid", "test")
SPLITS_RANDOM = ("calibration", "valid", "test")

_BY_NAME: dict[str, type] = {}
_BY_FIELDS: dict[frozenset[str], type] = {}


def _register(cls: type) -> type:
    _BY_NAME[cls.__name__] = cls
    _BY_FIELDS[frozenset(f.name for f in fields(cls))] = cls
    return cls


class ActivationScale(str, Enum):
    NEURON_ACTIVATIONS = "neuron_activations"
    SIMULATED_NORMALIZED_ACTIVATIONS = "simulated_normalized_activations"


@_register
@dataclass(frozen=True)
class ActivationRecord:
    """Tokens of one text window and one unit's activation on each token."""

    tokens: list[str]
    activations: list[float]


@_register
@dataclass(frozen=True)
class NeuronId:
    layer_index: int
    neuron_index: int


def interleaved_slices(splits: tuple[str, ...], n_per_split: int) -> dict[str, slice]:
    """OpenAI's interleaved split: split i takes items i, i+S, i+2S, ... (S = number of splits)."""
    stride = len(splits)
    return {s: slice(i, n_per_split * stride, stride) for i, s in enumerate(splits)}


def _split_of(recs: list[ActivationRecord], splits: tuple[str, ...], name: str,
              n_per_split: int | None, what: str, who: str) -> list[ActivationRecord]:
    """One split of ``recs``; asking for more records than exist is an error (OpenAI's
    neuron-explainer asserts it), never a silently smaller split."""
    from neuroscribe.errors import UserError

    n = len(recs) // len(splits) if n_per_split is None else n_per_split
    if n < 0:
        raise UserError(f"records per split must not be negative, got {n}")
    if n * len(splits) > len(recs):
        raise UserError(f"{who}: asked for {n} {what} records per split ({n * len(splits)} "
                        f"for the {len(splits)} splits {'/'.join(splits)}) but only {len(recs)} "
                        f"exist; ask for at most {len(recs) // len(splits)} per split "
                        "(--n-per-split)")
    return recs[interleaved_slices(splits, n)[name]]


@_register
@dataclass(frozen=True)
class NeuronRecord:
    neuron_id: NeuronId
    random_sample: list[ActivationRecord] = field(default_factory=list)
    random_sample_by_quantile: list[list[ActivationRecord]] | None = None
    quantile_boundaries: list[float] | None = None
    mean: float | None = math.nan
    variance: float | None = math.nan
    skewness: float | None = math.nan
    kurtosis: float | None = math.nan
    most_positive_activation_records: list[ActivationRecord] = field(default_factory=list)

    @property
    def max_activation(self) -> float:
        return max(max(r.activations) for r in self.most_positive_activation_records)

    def split(self, name: str, n_per_split: int | None = None) -> list[ActivationRecord]:
        """Records of one split. ``train`` is top records only; the others are top + random."""
        top = self.top_split(name, n_per_split)
        return top if name == "train" else top + self.random_split(name, n_per_split)

    def top_split(self, name: str, n_per_split: int | None = None) -> list[ActivationRecord]:
        return _split_of(self.most_positive_activation_records, SPLITS_TOP, name, n_per_split,
                         "top-activating", self._who)

    def random_split(self, name: str, n_per_split: int | None = None) -> list[ActivationRecord]:
        if name == "train":
            return []
        return _split_of(self.random_sample, SPLITS_RANDOM, name, n_per_split,
                         "random", self._who)

    @property
    def _who(self) -> str:
        return f"layer {self.neuron_id.layer_index} unit {self.neuron_id.neuron_index}"


@_register
@dataclass(frozen=True)
class SequenceSimulation:
    tokens: list[str]
    expected_activations: list[float]
    activation_scale: ActivationScale
    distribution_values: list[list[float]]
    distribution_probabilities: list[list[float]]
    uncalibrated_simulation: SequenceSimulation | None = None


@_register
@dataclass(frozen=True)
class ScoredSequenceSimulation:
    simulation: SequenceSimulation
    true_activations: list[float]
    ev_correlation_score: float
    rsquared_score: float | None = None
    absolute_dev_explained_score: float | None = None


@_register
@dataclass(frozen=True)
class ScoredSimulation:
    scored_sequence_simulations: list[ScoredSequenceSimulation]
    ev_correlation_score: float | None = None
    rsquared_score: float | None = None
    absolute_dev_explained_score: float | None = None


@_register
@dataclass(frozen=True)
class ScoredExplanation:
    explanation: str
    scored_simulation: ScoredSimulation


@_register
@dataclass(frozen=True)
class NeuronSimulationResults:
    neuron_id: NeuronId
    scored_explanations: list[ScoredExplanation]


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data with OpenAI's ``dataclass_name`` tags (first key, as theirs is)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {"dataclass_name": type(obj).__name__}
        for f in fields(obj):
            out[f.name] = to_jsonable(getattr(obj, f.name))
        return out
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if hasattr(obj, "item"):  # numpy / torch scalars: a float32 NaN must become null too
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # as orjson writes NaN and Inf
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), allow_nan=False, separators=(",", ":"))


def _hook(d: dict[str, Any]) -> Any:
    name = d.pop("dataclass_name", None)
    cls = _BY_NAME.get(name) if name else _BY_FIELDS.get(frozenset(d))
    if cls is None:
        return d
    if cls is SequenceSimulation:
        d["activation_scale"] = ActivationScale(d["activation_scale"])
    if cls is NeuronRecord:
        for k in ("mean", "variance", "skewness", "kurtosis"):
            d[k] = math.nan if d.get(k) is None else d[k]
    return cls(**d)


def loads(s: str | bytes) -> Any:
    """Load OpenAI-format JSON (theirs or ours) back into these dataclasses."""
    return json.loads(s, object_hook=_hook)
