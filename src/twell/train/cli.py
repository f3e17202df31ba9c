"""``twell train``: a preset plus flag overrides -> :func:`twell.train.train`.

Examples::

    twell train --preset tiny                            # CPU, embedded corpus, a few minutes
    twell train --preset tiny --max-steps 20 --no-progress
    twell train --preset tiny --l1-coeff 0 --backend reference   # the dense ReLU baseline
    accelerate launch --num_processes 8 -m twell.cli train --preset 1b --grad-accum 8 \\
        --dataset HuggingFaceFW/fineweb-edu --tokenizer HuggingFaceTB/SmolLM2-360M
    twell train --preset tiny --resume latest            # continue from output_dir's last checkpoint
"""

from __future__ import annotations

import argparse

from .config import PRESETS, add_config_arguments, config_from_args

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("Examples::", 1)[1]
    parser.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help="starting configuration (default: tiny)"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import json

    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .loop import train

    result = train(cfg)
    return 0 if result.history else 1
