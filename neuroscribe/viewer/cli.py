"""``neuroscribe serve RUN_DIR...`` and ``neuroscribe export-html RUN_DIR OUT``."""

from __future__ import annotations

import argparse
from pathlib import Path

from neuroscribe.viewer.server import ExportConfig, ServeConfig, serve


def _export_cli(args: argparse.Namespace) -> None:
    from neuroscribe.cli import config_from
    from neuroscribe.viewer.export import export_html

    n = export_html(Path(args.run), Path(args.out), config_from(args, ExportConfig))
    print(f"wrote {n} pages -> {Path(args.out) / 'index.html'}")


def add_cli(sub: argparse._SubParsersAction) -> None:
    from neuroscribe.cli import add_config, config_from

    p = sub.add_parser("serve", help="browse runs in a local web app",
                       description="Serve units, exemplars, explanations and scores of runs.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    add_config(p, ServeConfig)
    p.set_defaults(func=lambda a: serve([Path(r) for r in a.runs], config_from(a, ServeConfig)))
    p = sub.add_parser("export-html", help="write a run's viewer pages as a static site",
                       description="Write the viewer's pages as files that open from disk.")
    p.add_argument("run", metavar="RUN_DIR", help="run folder")
    p.add_argument("out", metavar="OUT", help="folder to write the site to")
    add_config(p, ExportConfig)
    p.set_defaults(func=lambda a: _export_cli(a))
