"""Pure scoring functions: OpenAI's correlation scoring, calibration and normalisation.

Nothing here calls a model. Every function takes plain sequences and returns numbers, so each
formula is tested against hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuroscribe.formats import (
    ActivationRecord,
    ActivationScale,
    ScoredSequenceSimulation,
    ScoredSimulation,
    SequenceSimulation,
)

NORMALIZATIONS = ("floor", "ceil")
"""``floor``: OpenAI's ``min(10, floor(10*relu(x)/max))``; ``ceil``: delphi's round-up variant."""


def relu(x: float) -> float:
    return max(0.0, x)


def max_activation(records: Sequence[ActivationRecord]) -> float:
    """OpenAI's calculate_max_activation: the max of relu(activation) over all records."""
    return max((relu(max(r.activations)) for r in records), default=0.0)


def normalize_activations(
    activations: Sequence[float], max_act: float, mode: str = "floor"
) -> list[int]:
    """Map raw activations onto integers 0..10.

    ``floor`` is OpenAI's rule (an activation of 0.35*max becomes 3). ``ceil`` is delphi's rule
    (it becomes 4), which gives every positive activation at least 1.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    if max_act <= 0:
        return [0 for _ in activations]
    rnd = math.floor if mode == "floor" else math.ceil
    return [min(10, int(rnd(10 * relu(x) / max_act))) for x in activations]


def correlation_score(real: Sequence[float], predicted: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant (OpenAI returns NaN too)."""
    r = np.asarray(real, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    if r.size < 2 or r.std() == 0 or p.std() == 0:
        return math.nan
    return float(np.corrcoef(r, p)[0, 1])


def rsquared_score(real: Sequence[float], predicted: Sequence[float]) -> float:
    """OpenAI's R^2: 1 - mean((real-pred)^2) / mean(real^2) (note: not centred)."""
    r = np.asarray(real, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    denom = float(np.mean(np.square(r)))
    return math.nan if denom == 0 else float(1 - np.mean(np.square(r - p)) / denom)


def absolute_dev_explained_score(real: Sequence[float], predicted: Sequence[float]) -> float:
    """OpenAI's 1 - mean(|real-pred|) / mean(|real|)."""
    r = np.asarray(real, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    denom = float(np.mean(np.abs(r)))
    return math.nan if denom == 0 else float(1 - np.mean(np.abs(r - p)) / denom)


@dataclass(frozen=True)
class LinearCalibration:
    """Least-squares map from simulated values to real activations (OpenAI's linear calibration)."""

    slope: float
    intercept: float

    @classmethod
    def fit(cls, simulated: Sequence[float], real: Sequence[float]) -> LinearCalibration:
        x = np.asarray(simulated, dtype=np.float64)
        y = np.asarray(real, dtype=np.float64)
        if x.size == 0:
            return cls(1.0, 0.0)
        var = float(np.var(x))
        if var == 0:  # a constant prediction: the best linear map is the mean
            return cls(0.0, float(y.mean()))
        slope = float(np.mean((x - x.mean()) * (y - y.mean())) / var)
        return cls(slope, float(y.mean() - slope * x.mean()))

    def apply(self, values: Sequence[float]) -> list[float]:
        return [self.slope * v + self.intercept for v in values]


def flatten(seqs: Sequence[Sequence[float]]) -> list[float]:
    return [x for s in seqs for x in s]


def calibrate(sim: SequenceSimulation, cal: LinearCalibration) -> SequenceSimulation:
    """A simulation mapped into the unit's activation scale, keeping the uncalibrated one."""
    return SequenceSimulation(
        tokens=sim.tokens,
        expected_activations=cal.apply(sim.expected_activations),
        activation_scale=ActivationScale.NEURON_ACTIVATIONS,
        distribution_values=[cal.apply(v) for v in sim.distribution_values],
        distribution_probabilities=sim.distribution_probabilities,
        uncalibrated_simulation=sim,
    )


def score_sequence(record: ActivationRecord, sim: SequenceSimulation) -> ScoredSequenceSimulation:
    real, pred = record.activations, sim.expected_activations
    return ScoredSequenceSimulation(
        simulation=sim,
        true_activations=list(real),
        ev_correlation_score=correlation_score(real, pred),
        rsquared_score=rsquared_score(real, pred),
        absolute_dev_explained_score=absolute_dev_explained_score(real, pred),
    )


def aggregate(scored: list[ScoredSequenceSimulation]) -> ScoredSimulation:
    """Scores over all tokens of all sequences at once (not a mean of per-sequence scores)."""
    real = flatten([s.true_activations for s in scored])
    pred = flatten([s.simulation.expected_activations for s in scored])
    return ScoredSimulation(
        scored_sequence_simulations=scored,
        ev_correlation_score=correlation_score(real, pred) if real else None,
        rsquared_score=rsquared_score(real, pred) if real else None,
        absolute_dev_explained_score=absolute_dev_explained_score(real, pred) if real else None,
    )


def score_records(
    records: Sequence[ActivationRecord],
    sims: Sequence[SequenceSimulation],
    calibration: LinearCalibration | None = None,
) -> ScoredSimulation:
    """Score simulations of ``records``; with a calibration, R^2 and abs-dev are meaningful."""
    if len(records) != len(sims):
        raise ValueError(f"{len(records)} records but {len(sims)} simulations")
    if calibration is not None:
        sims = [calibrate(s, calibration) for s in sims]
    return aggregate([score_sequence(r, s) for r, s in zip(records, sims)])


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def balanced_accuracy(predicted: Sequence[bool], labels: Sequence[bool]) -> float:
    """Mean of the true-positive rate and the true-negative rate."""
    p = np.asarray(predicted, dtype=bool)
    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        return math.nan
    return float(((p & y).sum() / y.sum() + (~p & ~y).sum() / (~y).sum()) / 2)


def f1_score(predicted: Sequence[bool], labels: Sequence[bool]) -> float:
    """2 TP / (2 TP + FP + FN); 0 when there is nothing to find and nothing found is NaN."""
    p = np.asarray(predicted, dtype=bool)
    y = np.asarray(labels, dtype=bool)
    tp, fp, fn = (p & y).sum(), (p & ~y).sum(), (~p & y).sum()
    denom = 2 * tp + fp + fn
    return math.nan if denom == 0 else float(2 * tp / denom)
