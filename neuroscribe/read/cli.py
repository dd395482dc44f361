"""``neuroscribe read RUN "text"``: a per-token view of the explained units that fire."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BOLD, DIM, CYAN, YELLOW, RESET = "\033[1m", "\033[2m", "\033[36m", "\033[33m", "\033[0m"


def _unit_line(u: dict[str, Any], color: bool, strength_key: str = "strength") -> str:
    score = "" if u.get("score") is None else f", score {u['score']:.2f}"
    words = u.get("explanation") or "(no explanation)"
    where = f"{u['hookpoint']}#{u['unit']}"
    if color:
        where, words = f"{DIM}{where}{RESET}", f"{YELLOW}{words}{RESET}"
    return f"{where} x{u[strength_key]:g}{score}: {words}"


def format_tokens(result: dict[str, Any], color: bool = False) -> str:
    """One block per token that has firing units; quiet tokens are joined on one line."""
    lines: list[str] = []
    quiet: list[str] = []
    for i, t in enumerate(result["tokens"]):
        if not t["units"]:
            quiet.append(t["token"])
            continue
        if quiet:
            q = "  " + repr("".join(quiet))
            lines.append(f"{DIM}{q}{RESET}" if color else q)
            quiet = []
        tok = repr(t["token"])
        lines.append(f"{i:>4} {BOLD}{CYAN}{tok}{RESET}" if color else f"{i:>4} {tok}")
        lines += [f"       {_unit_line(u, color)}" for u in t["units"]]
    if quiet:
        lines.append("  " + repr("".join(quiet)))
    return "\n".join(lines) if lines else "(no explained unit fired above its threshold)"


def format_summary(result: dict[str, Any], color: bool = False) -> str:
    if not result["summary"]:
        return "(no explained unit fired above its threshold)"
    lines = [f"most active units over {len(result['tokens'])} tokens "
             f"(threshold: recorded {result['quantile']} quantile):"]
    for u in result["summary"]:
        lines.append(f"  {_unit_line(u, color, 'total_strength')} "
                     f"({u['n_tokens']} token{'s' * (u['n_tokens'] != 1)})")
    return "\n".join(lines)


def _read_cli(args: argparse.Namespace) -> None:
    from neuroscribe.cli import config_from
    from neuroscribe.errors import UserError
    from neuroscribe.read.core import ReadConfig, read_text

    if (args.text is None) == (args.file is None):
        raise UserError("give the text or --file, one of them")
    text = Path(args.file).read_text() if args.file else args.text
    result = read_text(Path(args.run), text, config_from(args, ReadConfig))
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    color = sys.stdout.isatty() and not args.no_color
    print(format_summary(result, color) if args.summary else format_tokens(result, color))


def add_cli(sub: argparse._SubParsersAction) -> None:
    from neuroscribe.cli import add_config
    from neuroscribe.read.core import ReadConfig

    help_ = "show, token by token, the explained units that fire on a text, in words"
    p = sub.add_parser("read", help=help_, description=help_)
    p.add_argument("run", metavar="RUN_DIR", help="run folder (recorded, explained, scored)")
    p.add_argument("text", nargs="?", default=None, help="text to read (or --file)")
    p.add_argument("--file", default=None, help="read the text from this file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--summary", action="store_true",
                   help="only the units most active over the whole text")
    p.add_argument("--no-color", action="store_true", help="no colour even on a terminal")
    add_config(p, ReadConfig)
    p.set_defaults(func=_read_cli)
