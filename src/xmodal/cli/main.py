"""Entry point of the ``xmodal`` command: ``xmodal {demo,...} [options]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from xmodal.cli import bench, demo, show
from xmodal.cli import eval as eval_cmd
from xmodal.cli import train as train_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmodal", description="Cross-modal attention for PyTorch: demo, benchmarks, tools."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_parser(subparsers)
    bench.add_parser(subparsers)
    show.add_parser(subparsers)
    train_cmd.add_parser(subparsers)
    eval_cmd.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
