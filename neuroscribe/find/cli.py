"""The ``bench-find`` command: a suite, the agents and FIND's evaluation, as one report."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from neuroscribe.find.eval import FindConfig


def bench_find(cfg: FindConfig, suite_cfg: Any, llm_cfg: Any, resume: bool = False,
               rescore: bool = False) -> dict[str, Any]:
    from neuroscribe.find.report import run_bench

    return asyncio.run(run_bench(cfg, suite_cfg, llm_cfg, resume, rescore))


def _bench_cli(args: argparse.Namespace) -> None:
    from neuroscribe.cli import config_from
    from neuroscribe.find.report import format_tables
    from neuroscribe.find.suite import SuiteConfig
    from neuroscribe.llm.client import LLMConfig

    report = bench_find(config_from(args, FindConfig), config_from(args, SuiteConfig),
                        config_from(args, LLMConfig), args.resume or args.rescore,
                        args.rescore)
    print(format_tables(report))
    out = Path(args.out)
    print(f"report: {out / 'find.json'}  table: {out / 'find.txt'}")


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from neuroscribe.cli import add_config
    from neuroscribe.find.suite import SuiteConfig
    from neuroscribe.llm.client import LLMConfig

    text = "FIND-style function benchmark: a generated suite, agents, FIND's evaluation"
    p = sub.add_parser("bench-find", help=text, description=text)
    p.add_argument("--resume", action="store_true", help="reuse the answers already saved")
    p.add_argument("--rescore", action="store_true", help="score the saved answers again with "
                   "this version's evaluator (a generated suite is regenerated from its seed); "
                   "no agent runs again")
    for cls in (FindConfig, SuiteConfig, LLMConfig):
        add_config(p, cls)
    p.set_defaults(func=_bench_cli)
