"""Scoring formulas against hand-computed values (OpenAI neuron-explainer's definitions).

Every expected number below is worked out by hand in the comment next to it.
"""

from __future__ import annotations

import math

import pytest

from neuroscribe.formats import (
    ActivationRecord,
    ActivationScale,
    ScoredSequenceSimulation,
    SequenceSimulation,
)
from neuroscribe.score.core import (
    LinearCalibration,
    absolute_dev_explained_score,
    aggregate,
    calibrate,
    correlation_score,
    max_activation,
    normalize_activations,
    rsquared_score,
    score_records,
    score_sequence,
)


def sim(values: list[float], tokens: list[str] | None = None) -> SequenceSimulation:
    tokens = tokens if tokens is not None else [f"t{i}" for i in range(len(values))]
    return SequenceSimulation(
        tokens=tokens, expected_activations=list(values),
        activation_scale=ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS,
        distribution_values=[[v] for v in values],
        distribution_probabilities=[[1.0] for _ in values])


def rec(values: list[float]) -> ActivationRecord:
    return ActivationRecord(tokens=[f"t{i}" for i in range(len(values))], activations=list(values))


# ---------------------------------------------------------------- normalize_activations

# max_act = 8 keeps every 10*x/8 exact in binary floating point.
ACTS = [-3.0, 0.0, 0.25, 1.0, 2.0, 4.0, 7.5, 8.0, 12.0]
# 10*relu(x)/8:  0,   0, 0.3125, 1.25, 2.5, 5.0, 9.375, 10, 15
FLOOR = [0, 0, 0, 1, 2, 5, 9, 10, 10]  # floor, then min(10, .)
CEIL = [0, 0, 1, 2, 3, 5, 10, 10, 10]  # ceil, then min(10, .)


def test_normalize_floor_is_openai_rule() -> None:
    assert normalize_activations(ACTS, 8.0) == FLOOR  # floor is the default
    assert normalize_activations(ACTS, 8.0, "floor") == FLOOR


def test_normalize_ceil_is_delphi_rule() -> None:
    assert normalize_activations(ACTS, 8.0, "ceil") == CEIL


def test_normalize_docstring_example() -> None:
    # 0.35 * max: 10 * 0.35 / 1 = 3.5 -> floor 3 (OpenAI), ceil 4 (delphi)
    assert normalize_activations([0.35], 1.0, "floor") == [3]
    assert normalize_activations([0.35], 1.0, "ceil") == [4]


def test_normalize_returns_ints() -> None:
    out = normalize_activations([2.0, 8.0], 8.0)
    assert all(type(v) is int for v in out)


@pytest.mark.parametrize("max_act", [0.0, -1.0])
@pytest.mark.parametrize("mode", ["floor", "ceil"])
def test_normalize_nonpositive_max_gives_zeros(max_act: float, mode: str) -> None:
    assert normalize_activations([-2.0, 0.0, 3.0], max_act, mode) == [0, 0, 0]


def test_normalize_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="normalization"):
        normalize_activations([1.0], 1.0, "round")


# ---------------------------------------------------------------- max_activation

def test_max_activation() -> None:
    # max over records of relu(max(record)): max(2, 3.5) = 3.5
    assert max_activation([rec([-1.0, 2.0, 0.5]), rec([3.5, -7.0])]) == 3.5
    # every activation negative: relu -> 0
    assert max_activation([rec([-2.0, -1.0]), rec([-0.5])]) == 0.0
    assert max_activation([]) == 0.0


# ---------------------------------------------------------------- correlation / R^2 / abs dev

def test_correlation_hand_computed() -> None:
    # real [1,2,3,4], pred [2,1,4,3]: both means 2.5
    # dr = [-1.5,-0.5,0.5,1.5], dp = [-0.5,-1.5,1.5,0.5]
    # sum dr*dp = 0.75+0.75+0.75+0.75 = 3; sum dr^2 = sum dp^2 = 5 -> r = 3/5
    assert correlation_score([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6, abs=1e-12)
    # perfectly anti-correlated
    assert correlation_score([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0, abs=1e-12)
    # invariant to a positive affine map of the prediction: pred*3+7
    assert correlation_score([1, 2, 3, 4], [13, 10, 19, 16]) == pytest.approx(0.6, abs=1e-12)


def test_correlation_nan_on_constant_input() -> None:
    assert math.isnan(correlation_score([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    assert math.isnan(correlation_score([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]))
    assert math.isnan(correlation_score([1.0], [2.0]))


def test_rsquared_is_not_centred() -> None:
    # real [1,2,3], pred [1,1,5]: (r-p)^2 = [0,1,4], mean 5/3; mean(r^2) = 14/3
    # OpenAI's R^2 = 1 - (5/3)/(14/3) = 9/14  (a centred R^2 would be 1 - (5/3)/(2/3) = -1.5)
    assert rsquared_score([1, 2, 3], [1, 1, 5]) == pytest.approx(9 / 14, abs=1e-12)
    # with a negative activation: real [-2,1,3], pred [0,1,1]
    # (r-p)^2 = [4,0,4] mean 8/3; mean(r^2) = (4+1+9)/3 = 14/3 -> 1 - 8/14 = 3/7
    assert rsquared_score([-2, 1, 3], [0, 1, 1]) == pytest.approx(3 / 7, abs=1e-12)
    assert rsquared_score([1, 2, 3], [1, 2, 3]) == 1.0
    assert math.isnan(rsquared_score([0, 0], [1, 2]))


def test_absolute_dev_explained() -> None:
    # real [1,2,3], pred [1,1,5]: |r-p| = [0,1,2] mean 1; mean|r| = 2 -> 1 - 1/2 = 0.5
    assert absolute_dev_explained_score([1, 2, 3], [1, 1, 5]) == pytest.approx(0.5, abs=1e-12)
    # real [-2,1,3], pred [0,1,1]: |r-p| = [2,0,2] mean 4/3; mean|r| = 6/3 = 2 -> 1 - 2/3 = 1/3
    assert absolute_dev_explained_score([-2, 1, 3], [0, 1, 1]) == pytest.approx(1 / 3, abs=1e-12)
    assert math.isnan(absolute_dev_explained_score([0, 0], [1, 2]))


# ---------------------------------------------------------------- aggregate (flattened)

def test_aggregate_is_flattened_not_mean_of_sequences() -> None:
    # A: real [0,1],   pred [0,1] -> per-sequence r = +1
    # B: real [10,11], pred [2,1] -> per-sequence r = -1; mean of per-sequence r = 0
    a = score_sequence(rec([0, 1]), sim([0, 1]))
    b = score_sequence(rec([10, 11]), sim([2, 1]))
    assert a.ev_correlation_score == pytest.approx(1.0, abs=1e-12)
    assert b.ev_correlation_score == pytest.approx(-1.0, abs=1e-12)
    agg = aggregate([a, b])
    # flattened real [0,1,10,11] mean 5.5 -> dr = [-5.5,-4.5,4.5,5.5], sum dr^2 = 101
    # flattened pred [0,1,2,1]   mean 1   -> dp = [-1,0,1,0],          sum dp^2 = 2
    # sum dr*dp = 5.5 + 4.5 = 10 -> r = 10/sqrt(202)
    expected = 10 / math.sqrt(202)
    assert agg.ev_correlation_score == pytest.approx(expected, abs=1e-12)
    assert abs(agg.ev_correlation_score - 0.0) > 0.5  # far from the mean of per-sequence r
    # R^2: (r-p)^2 = [0,0,64,100] mean 41; mean r^2 = (0+1+100+121)/4 = 55.5
    # 1 - 41/55.5 = 1 - 82/111 = 29/111
    assert agg.rsquared_score == pytest.approx(29 / 111, abs=1e-12)
    # abs dev: |r-p| = [0,0,8,10] mean 4.5; mean|r| = 5.5 -> 1 - 9/11 = 2/11
    assert agg.absolute_dev_explained_score == pytest.approx(2 / 11, abs=1e-12)
    assert agg.scored_sequence_simulations == [a, b]


def test_aggregate_empty_is_none() -> None:
    agg = aggregate([])
    assert agg.ev_correlation_score is None
    assert agg.rsquared_score is None
    assert agg.absolute_dev_explained_score is None


def test_score_sequence_fields() -> None:
    s = sim([1, 1, 5])
    scored = score_sequence(rec([1, 2, 3]), s)
    assert isinstance(scored, ScoredSequenceSimulation)
    assert scored.simulation is s
    assert scored.true_activations == [1, 2, 3]
    assert scored.rsquared_score == pytest.approx(9 / 14, abs=1e-12)  # as in the R^2 test
    assert scored.absolute_dev_explained_score == pytest.approx(0.5, abs=1e-12)


# ---------------------------------------------------------------- calibration

def test_linear_calibration_least_squares() -> None:
    # x = [0,1,2,3] mean 1.5, y = [1,3,2,6] mean 3
    # dx = [-1.5,-0.5,0.5,1.5], dy = [-2,0,-1,3]
    # sum dx*dy = 3 + 0 - 0.5 + 4.5 = 7; sum dx^2 = 5 -> slope 7/5 = 1.4
    # intercept = 3 - 1.4*1.5 = 0.9
    cal = LinearCalibration.fit([0, 1, 2, 3], [1, 3, 2, 6])
    assert cal.slope == pytest.approx(1.4, abs=1e-12)
    assert cal.intercept == pytest.approx(0.9, abs=1e-12)
    # apply: 1.4*0 + 0.9 = 0.9; 1.4*10 + 0.9 = 14.9
    assert cal.apply([0.0, 10.0]) == pytest.approx([0.9, 14.9], abs=1e-12)


def test_linear_calibration_constant_prediction() -> None:
    # x constant: the best linear map is the mean of y = (1+2+6)/3 = 3
    cal = LinearCalibration.fit([2, 2, 2], [1, 2, 6])
    assert cal.slope == 0.0
    assert cal.intercept == pytest.approx(3.0, abs=1e-12)
    assert cal.apply([0.0, 100.0]) == pytest.approx([3.0, 3.0])


def test_linear_calibration_empty_is_identity() -> None:
    cal = LinearCalibration.fit([], [])
    assert (cal.slope, cal.intercept) == (1.0, 0.0)


def test_calibrate_keeps_uncalibrated_and_sets_scale() -> None:
    s = SequenceSimulation(
        tokens=["a", "b"], expected_activations=[0.0, 10.0],
        activation_scale=ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS,
        distribution_values=[[0.0, 5.0], [10.0]],
        distribution_probabilities=[[0.5, 0.5], [1.0]])
    out = calibrate(s, LinearCalibration(slope=0.5, intercept=1.0))
    # 0.5*0+1 = 1, 0.5*10+1 = 6, 0.5*5+1 = 3.5
    assert out.expected_activations == pytest.approx([1.0, 6.0])
    assert out.distribution_values[0] == pytest.approx([1.0, 3.5])
    assert out.distribution_values[1] == pytest.approx([6.0])
    assert out.distribution_probabilities == [[0.5, 0.5], [1.0]]
    assert out.tokens == ["a", "b"]
    assert out.activation_scale is ActivationScale.NEURON_ACTIVATIONS
    assert out.uncalibrated_simulation is s
    # the input is untouched
    assert s.expected_activations == [0.0, 10.0]
    assert s.activation_scale is ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS


def test_score_records_with_calibration() -> None:
    records = [rec([1, 2]), rec([3, 4])]
    sims = [sim([2, 1]), sim([4, 3])]
    cal = LinearCalibration(slope=2.0, intercept=-1.0)

    plain = score_records(records, sims)
    calibrated = score_records(records, sims, cal)

    # flattened real [1,2,3,4], pred [2,1,4,3]: r = 0.6 (see test_correlation_hand_computed);
    # a positive-slope linear map leaves it unchanged
    assert plain.ev_correlation_score == pytest.approx(0.6, abs=1e-12)
    assert calibrated.ev_correlation_score == pytest.approx(0.6, abs=1e-12)

    # uncalibrated R^2: (r-p)^2 = [1,1,1,1] mean 1; mean r^2 = 30/4 = 7.5 -> 1 - 1/7.5 = 13/15
    assert plain.rsquared_score == pytest.approx(13 / 15, abs=1e-12)
    # calibrated pred = 2p-1 = [3,1,7,5]; r-p = [-2,1,-4,-1], squares sum 22, mean 5.5
    # R^2 = 1 - 5.5/7.5 = 4/15
    assert calibrated.rsquared_score == pytest.approx(4 / 15, abs=1e-12)
    # abs dev: |r-p| = [2,1,4,1] mean 2; mean|r| = 2.5 -> 1 - 0.8 = 0.2
    assert calibrated.absolute_dev_explained_score == pytest.approx(0.2, abs=1e-12)

    seqs = calibrated.scored_sequence_simulations
    assert [s.simulation.expected_activations for s in seqs] == [[3.0, 1.0], [7.0, 5.0]]
    assert all(s.simulation.activation_scale is ActivationScale.NEURON_ACTIVATIONS
               for s in seqs)
    assert [s.simulation.uncalibrated_simulation for s in seqs] == sims
    assert [s.true_activations for s in seqs] == [[1, 2], [3, 4]]
    # without calibration the simulations are scored as given
    assert [s.simulation for s in plain.scored_sequence_simulations] == sims


def test_score_records_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 records but 1 simulations"):
        score_records([rec([1, 2]), rec([3, 4])], [sim([1, 2])])


# ---------------------------------------------------------------- token-match simulators


@pytest.mark.parametrize("explanation, token", [
    ('the token "\\""', '"'),  # the explanation's text: the token "\""
    ('fires on "\\\\"', "\\"),  # fires on "\\"
    ('quotes like "\\"" and "\\\\" and "x"', '"'),
    ('the escaped unicode "\\u00e9t\\u00e9"', "été"),
])
def test_token_match_unescapes_quoted_terms(explanation: str, token: str) -> None:
    import asyncio

    from neuroscribe.simulate.core import SimulateConfig, TokenMatchSimulator

    sim = TokenMatchSimulator(SimulateConfig(simulator="tokens"))
    out = asyncio.run(sim.simulate(explanation, ["a", token, " " + token, "b"]))
    assert out.expected_activations == [0.0, 10.0, 10.0, 0.0]


def test_quoted_terms_hand_written() -> None:
    from neuroscribe.simulate.core import quoted_terms

    assert quoted_terms('the token "\\""') == {'"'}
    assert quoted_terms('fires on "\\\\"') == {"\\"}
    assert quoted_terms('"The" and "a \\"b\\"" but not " "') == {"the", 'a "b"'}
    assert quoted_terms('"\\\\n" is a backslash and n; "\\n" a newline, stripped away') == {
        "\\n"}
    # an escape JSON does not know keeps its backslash; the known ones around it are undone
    assert quoted_terms('paths like "C:\\dir" or "C:\\\\dir\\"x"') == {"c:\\dir", 'c:\\dir"x'}


def test_embedding_simulator_token_match_unescapes() -> None:
    """The embedding simulator's token-match half matches the quoted '"' (similarity held 0)."""
    import asyncio

    import numpy as np

    from neuroscribe.simulate.core import EmbeddingSimulator, SimulateConfig

    sim = EmbeddingSimulator(SimulateConfig(embed_weight=0.5))
    sim.embed = lambda texts: np.zeros((len(texts), 384))  # type: ignore[assignment]
    out = asyncio.run(sim.simulate('the token "\\""', ["x", '"']))
    assert out.expected_activations == pytest.approx([0.0, 10.0 / 1.5])
