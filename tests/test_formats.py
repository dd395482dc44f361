"""OpenAI neuron-explainer JSON formats: round trips, their public format, and the splits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from neuroscribe.formats import (
    SPLITS_TOP,
    ActivationRecord,
    ActivationScale,
    NeuronId,
    NeuronRecord,
    NeuronSimulationResults,
    ScoredExplanation,
    ScoredSequenceSimulation,
    ScoredSimulation,
    SequenceSimulation,
    dumps,
    interleaved_slices,
    loads,
)

MOMENTS = ("mean", "variance", "skewness", "kurtosis")


def strip_names(obj: object) -> object:
    """The same JSON data without any dataclass_name keys (the older OpenAI files)."""
    if isinstance(obj, dict):
        return {k: strip_names(v) for k, v in obj.items() if k != "dataclass_name"}
    if isinstance(obj, list):
        return [strip_names(v) for v in obj]
    return obj


def all_dicts_named_first(obj: object) -> bool:
    if isinstance(obj, dict):
        return (next(iter(obj)) == "dataclass_name"
                and all(all_dicts_named_first(v) for v in obj.values()))
    if isinstance(obj, list):
        return all(all_dicts_named_first(v) for v in obj)
    return True


# ---------------------------------------------------------------- round trips

def test_activation_record_round_trip_and_json_shape() -> None:
    r = ActivationRecord(tokens=["a", " b", "\u00e9"], activations=[0.5, -1.25, 3.0])
    s = dumps(r)
    assert json.loads(s) == {"dataclass_name": "ActivationRecord", "tokens": ["a", " b", "\u00e9"],
                             "activations": [0.5, -1.25, 3.0]}
    assert next(iter(json.loads(s))) == "dataclass_name"
    back = loads(s)
    assert isinstance(back, ActivationRecord)
    assert back == r


def make_neuron_record() -> NeuronRecord:
    top = [ActivationRecord([f"t{i}", "x"], [float(10 - i), 0.0]) for i in range(4)]
    rnd = [ActivationRecord([f"r{i}", "y"], [0.25 * i, -0.5]) for i in range(3)]
    return NeuronRecord(
        neuron_id=NeuronId(layer_index=3, neuron_index=17),
        random_sample=rnd,
        random_sample_by_quantile=[rnd[:1], rnd[1:]],
        quantile_boundaries=[0.0, 1.5, 4.0],
        mean=0.125, variance=math.nan, skewness=math.nan, kurtosis=-1.5,
        most_positive_activation_records=top)


def test_neuron_record_round_trip_nan_moments() -> None:
    nr = make_neuron_record()
    s = dumps(nr)
    d = json.loads(s)  # strict JSON: no NaN literal anywhere
    assert "NaN" not in s
    assert d["variance"] is None and d["skewness"] is None  # NaN -> null, as orjson writes
    assert d["mean"] == 0.125 and d["kurtosis"] == -1.5
    assert d["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 3, "neuron_index": 17}
    assert all_dicts_named_first(d)

    back = loads(s)
    assert isinstance(back, NeuronRecord)
    assert isinstance(back.neuron_id, NeuronId)
    assert back.neuron_id == NeuronId(3, 17)
    assert math.isnan(back.variance) and math.isnan(back.skewness)  # null -> NaN
    assert back.mean == 0.125 and back.kurtosis == -1.5
    assert back.random_sample == nr.random_sample
    assert back.random_sample_by_quantile == nr.random_sample_by_quantile
    assert all(isinstance(r, ActivationRecord) for b in back.random_sample_by_quantile for r in b)
    assert back.quantile_boundaries == [0.0, 1.5, 4.0]
    assert back.most_positive_activation_records == nr.most_positive_activation_records
    assert back.max_activation == 10.0  # the largest activation of the top records
    # a second trip gives identical text
    assert dumps(back) == s


def make_results() -> NeuronSimulationResults:
    raw = SequenceSimulation(
        tokens=["a", "b"], expected_activations=[0.0, 10.0],
        activation_scale=ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS,
        distribution_values=[[0.0], [10.0]], distribution_probabilities=[[1.0], [1.0]])
    cal = SequenceSimulation(
        tokens=["a", "b"], expected_activations=[1.0, 6.0],
        activation_scale=ActivationScale.NEURON_ACTIVATIONS,
        distribution_values=[[1.0], [6.0]], distribution_probabilities=[[1.0], [1.0]],
        uncalibrated_simulation=raw)
    seq = ScoredSequenceSimulation(simulation=cal, true_activations=[0.5, 7.0],
                                   ev_correlation_score=1.0, rsquared_score=0.75,
                                   absolute_dev_explained_score=0.5)
    scored = ScoredSimulation(scored_sequence_simulations=[seq], ev_correlation_score=1.0,
                              rsquared_score=0.75, absolute_dev_explained_score=0.5)
    return NeuronSimulationResults(neuron_id=NeuronId(1, 2), scored_explanations=[
        ScoredExplanation(explanation="the letter b", scored_simulation=scored)])


# What dumps(make_results()) must parse to, written out by hand.
RESULTS_JSON = {
    "dataclass_name": "NeuronSimulationResults",
    "neuron_id": {"dataclass_name": "NeuronId", "layer_index": 1, "neuron_index": 2},
    "scored_explanations": [{
        "dataclass_name": "ScoredExplanation",
        "explanation": "the letter b",
        "scored_simulation": {
            "dataclass_name": "ScoredSimulation",
            "scored_sequence_simulations": [{
                "dataclass_name": "ScoredSequenceSimulation",
                "simulation": {
                    "dataclass_name": "SequenceSimulation",
                    "tokens": ["a", "b"],
                    "expected_activations": [1.0, 6.0],
                    "activation_scale": "neuron_activations",
                    "distribution_values": [[1.0], [6.0]],
                    "distribution_probabilities": [[1.0], [1.0]],
                    "uncalibrated_simulation": {
                        "dataclass_name": "SequenceSimulation",
                        "tokens": ["a", "b"],
                        "expected_activations": [0.0, 10.0],
                        "activation_scale": "simulated_normalized_activations",
                        "distribution_values": [[0.0], [10.0]],
                        "distribution_probabilities": [[1.0], [1.0]],
                        "uncalibrated_simulation": None,
                    },
                },
                "true_activations": [0.5, 7.0],
                "ev_correlation_score": 1.0,
                "rsquared_score": 0.75,
                "absolute_dev_explained_score": 0.5,
            }],
            "ev_correlation_score": 1.0,
            "rsquared_score": 0.75,
            "absolute_dev_explained_score": 0.5,
        },
    }],
}


def test_simulation_results_json_structure() -> None:
    d = json.loads(dumps(make_results()))
    assert d == RESULTS_JSON
    assert all_dicts_named_first(d)


def test_simulation_results_round_trip() -> None:
    res = make_results()
    back = loads(dumps(res))
    assert back == res
    seq = back.scored_explanations[0].scored_simulation.scored_sequence_simulations[0]
    assert isinstance(seq, ScoredSequenceSimulation)
    assert isinstance(seq.simulation, SequenceSimulation)
    # a str-Enum equals its string, so check the type itself came back
    assert type(seq.simulation.activation_scale) is ActivationScale
    assert seq.simulation.activation_scale is ActivationScale.NEURON_ACTIVATIONS
    raw = seq.simulation.uncalibrated_simulation
    assert isinstance(raw, SequenceSimulation)
    assert raw.activation_scale is ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS
    assert raw.uncalibrated_simulation is None


def test_results_without_dataclass_names_load_by_field_names() -> None:
    back = loads(json.dumps(strip_names(RESULTS_JSON)))
    assert back == make_results()
    seq = back.scored_explanations[0].scored_simulation.scored_sequence_simulations[0]
    assert seq.simulation.activation_scale is ActivationScale.NEURON_ACTIVATIONS


def test_nan_scores_become_null() -> None:
    scored = ScoredSimulation(scored_sequence_simulations=[], ev_correlation_score=math.nan,
                              rsquared_score=math.inf, absolute_dev_explained_score=-math.inf)
    d = json.loads(dumps(scored))
    assert d == {"dataclass_name": "ScoredSimulation", "scored_sequence_simulations": [],
                 "ev_correlation_score": None, "rsquared_score": None,
                 "absolute_dev_explained_score": None}


def test_numpy_and_torch_scalars() -> None:
    # numpy/torch scalars serialise as plain numbers; their NaN/Inf as null like Python floats
    r = ActivationRecord(tokens=["a", "b", "c", "d", "e"],
                         activations=[np.float32(0.5), np.float64(-2.0), torch.tensor(1.5),
                                      np.float32("nan"), torch.tensor(float("inf"))])
    assert json.loads(dumps(r))["activations"] == [0.5, -2.0, 1.5, None, None]
    nid = NeuronId(layer_index=np.int64(4), neuron_index=torch.tensor(9))
    assert json.loads(dumps(nid)) == {"dataclass_name": "NeuronId", "layer_index": 4,
                                      "neuron_index": 9}


# ---------------------------------------------------------------- OpenAI's public format

OPENAI_NEURON_RECORD = """
{"dataclass_name": "NeuronRecord",
 "neuron_id": {"dataclass_name": "NeuronId", "layer_index": 0, "neuron_index": 5},
 "random_sample": [
   {"dataclass_name": "ActivationRecord", "tokens": ["The", " cat"], "activations": [0.0, 0.1]},
   {"dataclass_name": "ActivationRecord", "tokens": [" sat", "."], "activations": [-0.2, 0.0]}],
 "random_sample_by_quantile": [
   [{"dataclass_name": "ActivationRecord", "tokens": ["a"], "activations": [0.05]}],
   [{"dataclass_name": "ActivationRecord", "tokens": ["b"], "activations": [1.5]}]],
 "quantile_boundaries": [0.0, 0.3, 2.0],
 "mean": 0.1,
 "variance": 0.25,
 "skewness": 3.5,
 "kurtosis": null,
 "most_positive_activation_records": [
   {"dataclass_name": "ActivationRecord", "tokens": [" dog", "s"], "activations": [4.0, 2.5]},
   {"dataclass_name": "ActivationRecord", "tokens": [" pup"], "activations": [3.0]}]}
"""


def check_openai_record(nr: NeuronRecord) -> None:
    assert isinstance(nr, NeuronRecord)
    assert nr.neuron_id == NeuronId(layer_index=0, neuron_index=5)
    assert nr.random_sample == [ActivationRecord(["The", " cat"], [0.0, 0.1]),
                                ActivationRecord([" sat", "."], [-0.2, 0.0])]
    assert nr.random_sample_by_quantile == [[ActivationRecord(["a"], [0.05])],
                                            [ActivationRecord(["b"], [1.5])]]
    assert nr.quantile_boundaries == [0.0, 0.3, 2.0]
    assert (nr.mean, nr.variance, nr.skewness) == (0.1, 0.25, 3.5)
    assert math.isnan(nr.kurtosis)
    assert nr.most_positive_activation_records == [ActivationRecord([" dog", "s"], [4.0, 2.5]),
                                                   ActivationRecord([" pup"], [3.0])]
    assert nr.max_activation == 4.0


def test_load_openai_neuron_record() -> None:
    check_openai_record(loads(OPENAI_NEURON_RECORD))


def test_load_openai_neuron_record_bytes() -> None:
    check_openai_record(loads(OPENAI_NEURON_RECORD.encode()))


def test_load_openai_neuron_record_without_dataclass_names() -> None:
    text = json.dumps(strip_names(json.loads(OPENAI_NEURON_RECORD)))
    assert "dataclass_name" not in text
    check_openai_record(loads(text))


def test_openai_record_dumps_back_to_same_structure() -> None:
    original = json.loads(OPENAI_NEURON_RECORD)
    again = json.loads(dumps(loads(OPENAI_NEURON_RECORD)))
    assert again == original  # including every dataclass_name and the null kurtosis
    assert list(again) == list(original)  # same key order, dataclass_name first


def test_plain_dicts_are_left_alone() -> None:
    assert loads('{"a": 1, "tokens": ["x"]}') == {"a": 1, "tokens": ["x"]}


# ---------------------------------------------------------------- interleaved splits

def test_interleaved_slices_hand_checked() -> None:
    sl = interleaved_slices(("train", "calibration", "valid", "test"), 2)
    items = list(range(8))
    assert items[sl["train"]] == [0, 4]
    assert items[sl["calibration"]] == [1, 5]
    assert items[sl["valid"]] == [2, 6]
    assert items[sl["test"]] == [3, 7]
    # only the first n_per_split * n_splits items are used
    assert list(range(11))[sl["test"]] == [3, 7]


def split_record(n_top: int = 8, n_random: int = 6) -> NeuronRecord:
    return NeuronRecord(
        neuron_id=NeuronId(0, 0),
        random_sample=[ActivationRecord([f"r{i}"], [0.0]) for i in range(n_random)],
        most_positive_activation_records=[ActivationRecord([f"t{i}"], [float(n_top - i)])
                                          for i in range(n_top)])


def names(records: list[ActivationRecord]) -> list[str]:
    return [r.tokens[0] for r in records]


def test_neuron_record_splits() -> None:
    nr = split_record()
    # top: 8 records / 4 splits = 2 each, stride 4; random: 6 / 3 = 2 each, stride 3
    assert names(nr.split("train")) == ["t0", "t4"]  # top only
    assert names(nr.split("calibration")) == ["t1", "t5", "r0", "r3"]
    assert names(nr.split("valid")) == ["t2", "t6", "r1", "r4"]
    assert names(nr.split("test")) == ["t3", "t7", "r2", "r5"]
    assert nr.random_split("train") == []
    assert names(nr.top_split("valid")) == ["t2", "t6"]
    assert names(nr.random_split("valid")) == ["r1", "r4"]


def test_neuron_record_splits_disjoint_and_cover() -> None:
    nr = split_record()
    parts = {s: names(nr.split(s)) for s in SPLITS_TOP}
    seen = [x for p in parts.values() for x in p]
    assert len(seen) == len(set(seen))  # pairwise disjoint
    assert set(seen) == {f"t{i}" for i in range(8)} | {f"r{i}" for i in range(6)}


def test_neuron_record_splits_explicit_size() -> None:
    nr = split_record()
    # n_per_split = 1: top stride 4 -> item i; random stride 3 -> item i-1
    assert names(nr.split("train", 1)) == ["t0"]
    assert names(nr.split("calibration", 1)) == ["t1", "r0"]
    assert names(nr.split("test", 1)) == ["t3", "r2"]


@pytest.mark.parametrize("split", ["train", "calibration", "valid", "test"])
def test_split_of_round_tripped_record(split: str) -> None:
    nr = split_record()
    assert loads(dumps(nr)).split(split) == nr.split(split)


def test_neuron_record_split_larger_than_recorded_is_an_error() -> None:
    from neuroscribe.errors import UserError

    nr = split_record()  # 8 top (2 per split), 6 random (2 per split)
    assert names(nr.split("test", 2)) == ["t3", "t7", "r2", "r5"]  # exactly all: fine
    with pytest.raises(UserError, match=r"layer 0 unit 0: asked for 3 top-activating records "
                                        r"per split \(12 for the 4 splits "
                                        r"train/calibration/valid/test\) but only 8 exist; "
                                        r"ask for at most 2 per split"):
        nr.split("train", 3)
    with pytest.raises(UserError, match=r"asked for 3 random records per split \(9 for the 3 "
                                        r"splits calibration/valid/test\) but only 6 exist"):
        split_record(n_top=12).split("valid", 3)  # enough top records, too few random ones
    with pytest.raises(UserError, match="only 6 exist"):
        nr.random_split("test", 3)
    assert nr.random_split("train", 100) == []  # train has no random records to ask for
