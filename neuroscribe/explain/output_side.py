"""The unit's output side shown to an explainer (``--with-output-tokens``): its top promoted
and suppressed tokens (logit lens, ``RUN/output_tokens``), worded by
``data/prompts/output_tokens.json``."""

from __future__ import annotations

import json
from typing import Any

from neuroscribe.prompts import Messages, load


def output_token_terms(output: dict[str, Any], side: str) -> str:
    """The first ``n`` tokens of one side (promoted, suppressed) of a unit's output tokens,
    JSON-quoted and comma-separated."""
    n = load("output_tokens")["n"]
    return ", ".join(json.dumps(t, ensure_ascii=False) for t, _ in output[side][:n])


def with_output_tokens(msgs: Messages, output: dict[str, Any]) -> Messages:
    """``msgs`` with the unit's output tokens appended to the last user message."""
    line = load("output_tokens")["line"].format(
        promoted=output_token_terms(output, "promoted"),
        suppressed=output_token_terms(output, "suppressed"))
    last = max(i for i, (role, _) in enumerate(msgs) if role == "user")
    return (*msgs[:last], ("user", msgs[last][1] + line), *msgs[last + 1:])
