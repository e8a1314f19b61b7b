"""``xmodal bench``: time xmodal against the notebook's code, PyTorch and peer libraries.

Prints the machine, a table per cell and the targets of issues 2 and 8; ``--json``, ``--plot``
and ``--markdown`` write every figure, a PNG and the Markdown of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from xmodal.bench.grid import DTYPES, MODES, PRESETS, make_cells
from xmodal.bench.impls import IMPLS
from xmodal.bench.report import (
    check_targets,
    format_checks,
    format_header,
    format_reference,
    format_table,
)
from xmodal.bench.runner import BenchConfig, run
from xmodal.checkpoint import atomic_write_text

# per preset: (rounds at least, seconds per sample at least, seconds of timing per cell for
# extra rounds, GEMM reference size on CPU)
PRESET_EFFORT = {
    "smoke": (3, 0.0, 0.0, 64),
    "quick": (5, 0.005, 1.0, 1024),
    "issue2": (7, 0.05, 6.0, 2048),
    "full": (5, 0.05, 4.0, 2048),
    "gpu": (7, 0.03, 3.0, 2048),
}


def _names(values: list[str] | None) -> tuple[str, ...] | None:
    """``["a,b", "c"]`` -> ``("a", "b", "c")``; ``None`` stays ``None``."""
    if not values:
        return None
    return tuple(v for value in values for v in value.split(",") if v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``xmodal bench`` (shared with the scripts in ``benchmarks/``)."""
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--quick", action="store_true", help="a small grid that runs in about a minute (default)"
    )
    which.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="quick | issue2 (notebook + large shape) | full (docs/benchmarks.md) | gpu",
    )
    p.add_argument(
        "--impl",
        action="append",
        metavar="NAME[,NAME]",
        help="only these implementations (repeatable; see --list)",
    )
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="only these dtypes")
    p.add_argument("--mode", action="append", choices=MODES, help="only these modes")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, help="torch threads (default: all logical CPUs)")
    p.add_argument(
        "--rounds", type=int, help="interleaved timing rounds per cell (fixed; default: adaptive)"
    )
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls (default: 1)")
    p.add_argument("--min-sample-ms", type=float, help="each timing sample lasts at least this")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-decode", action="store_true", help="do not run benchmarks/bench_decode.py")
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc malloc's defaults (default: hold freed memory; docs/benchmarks.md)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG (needs matplotlib)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="write the tables as Markdown")
    p.add_argument("--list", action="store_true", help="list implementations and cells, then exit")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark xmodal against the notebook's code, nn.MultiheadAttention and peers",
        description=(
            "Time xmodal's CrossModalAttention (fused and explicit paths) against the seed "
            "notebook's code, torch.nn.MultiheadAttention and, when installed, Hugging Face "
            "Mllama/Idefics cross-attention and flamingo-pytorch, on the same inputs: median "
            "and spread over interleaved rounds, GFLOP/s, fraction of the same-dtype GEMM "
            "throughput, peak extra memory (a fresh process per cell)."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=run_command)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    preset = args.preset or "quick"
    rounds, min_sample_s, budget_s, gemm_n = PRESET_EFFORT[preset]
    if args.device.startswith("cuda"):
        gemm_n = 8192  # a GPU needs a large product to reach its peak
    return BenchConfig(
        preset=preset,
        impls=_names(args.impl),
        dtypes=_names(args.dtype),
        modes=_names(args.mode),
        device=args.device,
        threads=args.threads,
        rounds=args.rounds or rounds,
        budget_s=0.0 if args.rounds else budget_s,
        warmup=args.warmup,
        min_sample_s=min_sample_s if args.min_sample_ms is None else args.min_sample_ms / 1e3,
        memory=not args.no_memory,
        gemm_n=gemm_n,
        decode=not args.no_decode,
        quick=preset == "quick",
        hold_memory=not args.system_malloc,
    )


def _list(config: BenchConfig) -> None:
    print("implementations:")
    for impl in IMPLS:
        print(f"  {impl.name:20s} {impl.family:6s} {impl.description}")
    cells = make_cells(config.preset, dtypes=config.dtypes, modes=config.modes)
    print(f"cells of preset {config.preset!r} ({len(cells)}):")
    for cell in cells:
        print(f"  {cell.label}  [{cell.group}]")


def run_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.list:
        _list(config)
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stderr)

    def save_partial(partial: dict[str, object]) -> None:
        if args.json:  # a run cut short (a time limit) still leaves the cells it finished
            atomic_write_text(args.json, json.dumps(partial, indent=1) + "\n")

    try:
        result = run(config, on_cell=save_partial)
    except ValueError as err:
        print(f"xmodal bench: {err}", file=sys.stderr)
        return 2
    print(format_header(result))
    print()
    print(format_table(result))
    print("\ntargets:")
    print(format_checks(check_targets(result)))
    if config.device.startswith("cuda"):
        print("\nattention cores against FlashAttention-3 (TFLOP/s, % of the H100 SXM figure):")
        print(format_reference(result))
    decode = result.get("decode")
    if isinstance(decode, dict):
        print("\ndecode step:", decode.get("skipped", decode.get("command", "")))
        if decode.get("stdout"):
            print(str(decode["stdout"]).rstrip())
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if args.markdown:
        from xmodal.bench.report import to_markdown

        atomic_write_text(args.markdown, to_markdown(result))
        print(f"wrote {args.markdown}")
    if args.plot:
        from xmodal.bench.report import plot

        try:
            print(f"wrote {plot(result, args.plot)}")
        except ImportError as err:
            print(f"no plot: {err} (pip install matplotlib)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None, *, prog: str = "xmodal bench") -> int:
    """Run ``xmodal bench`` with ``argv``; the scripts in ``benchmarks/`` call this."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
