"""A TOML run config: one table per stage, so ``run`` can explain with one LLM and score with
another. Flags given on the command line override the file; the resolved config is saved in the
run folder as ``run.toml``.

```toml
[record]
hookpoints = "model.layers.5.mlp.act_fn"
max_tokens = 200000

[explain]
explainer = "highlight"
provider = "openai"
base_url = "http://127.0.0.1:8000/v1"
llm_model = "Qwen/Qwen2.5-7B-Instruct"

[score]
simulator = "openai"
provider = "llamacpp"
llm_model = "qwen2.5-coder-1.5b"
```
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError


def _stages() -> dict[str, type]:
    from neuroscribe.explain.core import ExplainConfig
    from neuroscribe.pipeline import ScoreConfig
    from neuroscribe.record.core import RecordConfig

    return {"record": RecordConfig, "explain": ExplainConfig, "score": ScoreConfig}


def _coerce(value: Any, default: Any, where: str) -> Any:
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def load_run_config(path: str | Path) -> dict[str, dict[str, Any]]:
    """The file's tables, checked: known stages, known fields, the fields' types."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"run config not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: not valid TOML ({e})") from None
    stages = _stages()
    out: dict[str, dict[str, Any]] = {}
    for stage, table in raw.items():
        if stage not in stages or not isinstance(table, dict):
            raise UserError(f"{p}: unknown table [{stage}]; have {sorted(stages)}")
        fields = {f.name: f.default for f in dataclasses.fields(stages[stage])}
        for key, value in table.items():
            if key not in fields:
                raise UserError(f"{p}: [{stage}] has no field {key!r}")
            table[key] = _coerce(value, fields[key], f"{p}: [{stage}] {key}")
        out[stage] = table
    return out


def stage_configs(tables: dict[str, dict[str, Any]], flags: dict[str, Any]) -> dict[str, Any]:
    """Each stage's config: its defaults, then its table, then the flags given (a flag shared
    by two stages, such as ``--provider``, sets both)."""
    out = {}
    for stage, cls in _stages().items():
        names = {f.name for f in dataclasses.fields(cls)}
        values = {**tables.get(stage, {}), **{k: v for k, v in flags.items() if k in names}}
        out[stage] = cls(**values)
    return out


def dump_run_config(configs: dict[str, Any]) -> str:
    """The configs as TOML (every field, so the file alone reproduces the run)."""
    lines: list[str] = []
    for stage, cfg in configs.items():
        lines.append(f"[{stage}]")
        for k, v in dataclasses.asdict(cfg).items():
            text = ("true" if v else "false") if isinstance(v, bool) else (
                json.dumps(v) if isinstance(v, str) else repr(v))
            lines.append(f"{k} = {text}")
        lines.append("")
    return "\n".join(lines)
