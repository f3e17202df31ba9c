"""The ``twell`` command line: ``twell demo | train | bench | stats``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand is used.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

__all__ = ["main", "SUBCOMMANDS"]

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": (
        "twell.demo",
        "train a tiny sparse LM on the embedded corpus, then show its sparsity, sample text and FFN timings "
        "(the `make demo` job)",
    ),
    "train": ("twell.train.cli", "train a sparse LM with the L1 recipe (presets tiny, 0.5b, 1b, 1.5b, 2b)"),
    "bench": ("twell.bench.cli", "benchmark kernels, models and training steps against dense"),
    "stats": ("twell.bench.stats_cli", "per-layer sparsity analysis of a model over text, with plots"),
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twell", description="Activation-sparse FFNs for transformer LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if not _available(module):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    mod = importlib.import_module(args._module)
    return int(mod.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
