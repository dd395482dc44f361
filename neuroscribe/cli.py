"""The ``neuroscribe`` command line. Each stage's dataclass config becomes its options."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError

log = logging.getLogger("neuroscribe")


def add_config(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` option per dataclass field, documented by the field's help."""
    group = parser.add_argument_group(f"{cls.__name__} ({(cls.__doc__ or '').strip()})")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if flag in parser._option_string_actions:  # shared by two stages of 'run'
            continue
        kind = type(f.default)
        helptext = f"{f.metadata.get('help', '')} (default: {f.default})"
        if kind is bool:
            group.add_argument(flag, dest=f.name, default=f.default, help=helptext,
                               action=argparse.BooleanOptionalAction)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, help=helptext,
                               metavar=f.name.upper(), choices=f.metadata.get("choices"))


def config_from(args: argparse.Namespace, cls: type) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _hookpoints(args: argparse.Namespace) -> None:
    import fnmatch

    from neuroscribe.models import list_hookpoints, load_subject

    subject = load_subject(args.model)
    for name in list_hookpoints(subject.model):
        if fnmatch.fnmatchcase(name, args.filter):
            print(name)


def _record(args: argparse.Namespace) -> None:
    from neuroscribe.record.core import RecordConfig, record

    info = record(config_from(args, RecordConfig), Path(args.out), args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        ranks = f", {info['world_size']} ranks" if info.get("world_size", 1) > 1 else ""
        print(f"recorded {info['n_tokens']} tokens at {', '.join(info['hookpoints'])} "
              f"({info['tokens_per_second']:.0f} tok/s{ranks}) -> {args.out}")


def _explain(args: argparse.Namespace) -> None:
    from neuroscribe.explain.core import ExplainConfig, explain

    res = explain(config_from(args, ExplainConfig), Path(args.run), args.resume)
    print(f"explained {res['explained']} units, {res['failed']} failed -> {args.run}")


def _output_tokens(args: argparse.Namespace) -> None:
    from neuroscribe.record.output_tokens import OutputTokensConfig, write_output_tokens

    paths = write_output_tokens(Path(args.out), config_from(args, OutputTokensConfig))
    print(f"wrote the output tokens of {len(paths)} hookpoints -> "
          f"{Path(args.out) / 'output_tokens'}")


def _print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    from neuroscribe.results import format_summary, format_usage

    print(format_summary(summary))
    if usage := format_usage(run_dir):
        print(usage)
    print(f"index: {run_dir / 'index.sqlite'}  histogram: {run_dir / 'score_hist.png'}")


def _score(args: argparse.Namespace) -> None:
    from neuroscribe.pipeline import ScoreConfig, score

    _print_summary(Path(args.run), score(config_from(args, ScoreConfig), Path(args.run),
                                         args.resume))


def _run(args: argparse.Namespace) -> None:
    from neuroscribe.pipeline import run
    from neuroscribe.run_config import (
        dump_run_config,
        load_run_config,
        stage_configs,
    )
    from neuroscribe.runs import atomic_write_text

    t0 = time.perf_counter()
    out = Path(args.out)
    tables = load_run_config(args.config) if args.config else {}
    given = vars(args) if not args.config else {k: getattr(args, k) for k in args.given}
    cfgs = stage_configs(tables, given)
    summary = run(cfgs["record"], cfgs["explain"], cfgs["score"], out, args.resume)
    atomic_write_text(out / "run.toml", dump_run_config(cfgs))
    _print_summary(out, summary)
    print(f"total time: {time.perf_counter() - t0:.0f}s")


def _puzzles(args: argparse.Namespace) -> None:
    from neuroscribe.explain.core import ExplainConfig, make_explainer
    from neuroscribe.groundtruth.puzzles import PuzzleConfig, check, format_report
    from neuroscribe.llm.client import LLMConfig
    from neuroscribe.simulate.core import SimulateConfig, make_simulator

    llm = {f.name: getattr(args, f.name) for f in dataclasses.fields(LLMConfig)}
    report = check(config_from(args, PuzzleConfig),
                   lambda n: make_simulator(SimulateConfig(simulator=n, **llm)),
                   lambda n: make_explainer(ExplainConfig(explainer=n, **llm)))
    print(format_report(report))
    print(f"report: {Path(args.out) / 'puzzles.json'}")


def _train_sae(args: argparse.Namespace) -> None:
    from neuroscribe.sae.acts import ActsConfig
    from neuroscribe.sae.launch import train_sae_command
    from neuroscribe.sae.train import TrainSaeConfig

    done = train_sae_command(config_from(args, ActsConfig), config_from(args, TrainSaeConfig),
                             Path(args.out), args.resume)
    for out, m in done:  # under torchrun: rank 0's SAE, or each rank's own hookpoints
        h, s = m["held_out"], m["spliced"]
        print(f"trained {m['steps']} steps ({m['tokens']} tokens, {m['seconds']:.0f}s): "
              f"FVU {h['fvu']:.3f}, L0 {h['l0']:.1f}, dead {m['dead_fraction']:.1%}, "
              f"CE recovered {s['ce_loss_recovered']:.3f}, KL {s['kl_sae']:.3f} -> {out}")


def _stage_configs() -> dict[str, list[type]]:
    from neuroscribe.explain.core import ExplainConfig
    from neuroscribe.groundtruth.puzzles import PuzzleConfig
    from neuroscribe.llm.client import LLMConfig
    from neuroscribe.pipeline import ScoreConfig
    from neuroscribe.record.core import RecordConfig
    from neuroscribe.record.output_tokens import OutputTokensConfig
    from neuroscribe.sae.acts import ActsConfig
    from neuroscribe.sae.train import TrainSaeConfig

    return {"record": [RecordConfig], "explain": [ExplainConfig], "score": [ScoreConfig],
            "run": [RecordConfig, ExplainConfig, ScoreConfig],
            "puzzles": [PuzzleConfig, LLMConfig], "train-sae": [ActsConfig, TrainSaeConfig],
            "output-tokens": [OutputTokensConfig]}


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "hookpoints": (_hookpoints, "list a model's hookpoints (its module paths)"),
    "record": (_record, "stream a corpus through a model; keep each unit's exemplars and stats"),
    "output-tokens": (_output_tokens, "write each unit's top promoted and suppressed tokens "
                      "(logit lens of its output direction) into a recorded run"),
    "explain": (_explain, "write one explanation per unit from its train records"),
    "score": (_score, "simulate activations from explanations and score them (OpenAI method)"),
    "run": (_run, "record, explain and score in one go"),
    "puzzles": (_puzzles, "check simulators and explainers on OpenAI's 19 neuron puzzles"),
    "train-sae": (_train_sae, "train a sparse autoencoder on a hookpoint's activations"),
}


# Modules that register their own sub-commands: each has ``add_cli(sub)``, which adds parsers
# with ``set_defaults(func=...)``. Their top level imports only the standard library.
PLUGINS: list[str] = ["neuroscribe.groundtruth.bench_planted", "neuroscribe.viewer.cli",
                      "neuroscribe.find.cli", "neuroscribe.groundtruth.check_simulator",
                      "neuroscribe.vision.cli", "neuroscribe.read.cli"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="neuroscribe",
        description="Turn the units of a neural network into words and measure how true they are.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in PLUGINS:
        importlib.import_module(module).add_cli(sub)
    configs = _stage_configs()
    for name, (_, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
        if name == "hookpoints":
            p.add_argument("model", nargs="?", default="smollm2",
                           help="model: smollm2, a .gguf file, a folder or a hub id")
            p.add_argument("--filter", default="*", help="glob over hookpoint names")
        elif name in ("explain", "score"):
            p.add_argument("run", help="run folder written by 'record'")
        elif name != "puzzles":
            p.add_argument("--out", required=True, help="run folder to write")
        if name not in ("hookpoints", "puzzles", "output-tokens"):
            p.add_argument("--resume", action="store_true",
                           help="continue a run in this folder, skipping finished work")
        if name == "run":
            p.add_argument("--config", default="", help="TOML file with a table per stage "
                           "([record], [explain], [score]); flags given override it")
        for cls in configs.get(name, []):
            add_config(p, cls)
    for p in sub.choices.values():
        if "--debug" not in p._option_string_actions:
            p.add_argument("--debug", action="store_true", help="show tracebacks")
            p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options actually present in ``argv`` (defaults suppressed)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(argv)
    finally:
        for a, d in saved:
            a.default = d
    return set(vars(ns))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        args.given = given_flags(sub.choices["run"], argv[argv.index("run") + 1:])
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(message)s")
    try:
        func = getattr(args, "func", None) or COMMANDS[args.command][0]
        func(args)
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        print(f"neuroscribe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuroscribe: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback under --debug
        if getattr(args, "debug", False):
            raise
        print(f"neuroscribe: error: {type(e).__name__}: {e} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
