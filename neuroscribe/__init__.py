"""neuroscribe: turn the units of a neural network into words and measure how true they are.

The public API is the names below; each is imported on first use, so ``import neuroscribe``
stays light. Everything else lives in the subpackages (``neuroscribe.record``, ``.explain``,
``.simulate``, ``.score``, ``.llm``, ``.sae``, ``.find``, ``.groundtruth``, ``.viewer``,
``.vision``), whose names the API never reuses.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    # the three stages and the whole pipeline, each writing plain files in a run folder
    "RecordConfig": "neuroscribe.record.core:RecordConfig",
    "record_units": "neuroscribe.record.core:record",
    "ExplainConfig": "neuroscribe.explain.core:ExplainConfig",
    "explain_units": "neuroscribe.explain.core:explain",
    "ScoreConfig": "neuroscribe.pipeline:ScoreConfig",
    "score_units": "neuroscribe.pipeline:score",
    "run": "neuroscribe.pipeline:run",
    # reading a run: OpenAI's record types
    "RecordStore": "neuroscribe.record.core:RecordStore",
    "NeuronRecord": "neuroscribe.formats:NeuronRecord",
    "ActivationRecord": "neuroscribe.formats:ActivationRecord",
    # the parts, for use outside a run folder
    "make_explainer": "neuroscribe.explain.core:make_explainer",
    "make_simulator": "neuroscribe.simulate.core:make_simulator",
    "LLMConfig": "neuroscribe.llm.client:LLMConfig",
    "load_sae": "neuroscribe.sae.model:load_sae",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'neuroscribe' has no attribute {name!r}")
    module, _, attr = _API[name].partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
