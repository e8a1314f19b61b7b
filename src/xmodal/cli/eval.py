"""``xmodal eval``: the paper's table for a checkpoint, beside the published figures.

:func:`compute_metrics` computes (a dict, also what ``--json`` writes); :func:`format_table`
turns it into the printed table. Add new figures to the dict, and a line to the table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from xmodal.checkpoint import atomic_write_text
from xmodal.data.sort_of_clevr import SUBTYPE_NAMES, SortOfClevr, generate
from xmodal.pointing import sort_of_clevr_pointing
from xmodal.training import evaluate, load_model

FRESH_TEST_SEED = 20170605
"""Seed of the fresh test set when no ``--data`` is given (no training config uses it)."""

# (name, non-relational, relational): the published figures, as printed in their sources.
PUBLISHED: tuple[tuple[str, str, str], ...] = (
    ("CNN+RN (Santoro et al. 2017)", ">94%", "94%"),
    ("CNN+MLP (Santoro et al. 2017)", ">94%", "63%"),
    ("RN, kimhc6028 reimplementation", "99%", "89%"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a Sort-of-CLEVR checkpoint: the paper's table",
        description=(
            "Evaluate a Sort-of-CLEVR checkpoint on a test split (a .npz, or 200 fresh images) "
            "and print non-relational / relational accuracy and per subtype, beside the "
            "published RN and CNN+MLP figures."
        ),
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a model.safetensors from `xmodal train` (default: the one shipped with xmodal)",
    )
    p.add_argument("--data", default=None, help="test split .npz (default: fresh scenes)")
    p.add_argument("--images", type=int, default=200, help="fresh test images (default 200)")
    p.add_argument(
        "--seed",
        type=int,
        default=FRESH_TEST_SEED,
        help=f"fresh test seed (default {FRESH_TEST_SEED})",
    )
    p.add_argument("--json", default=None, help="also write the figures as JSON to this path")
    p.set_defaults(func=run)


def shipped_checkpoint() -> Path:
    """The checkpoint shipped inside the package (``xmodal/assets/sort_of_clevr.safetensors``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "sort_of_clevr.safetensors"


def compute_metrics(checkpoint: str | Path, data: SortOfClevr) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``data``: :func:`xmodal.training.evaluate`'s dict plus
    ``checkpoint`` and the model ``kind``."""
    model, meta = load_model(checkpoint)
    metrics = evaluate(model, data)
    if model.config.kind == "flamingo" and data.object_center is not None:
        # where the named object is, against where the cross-attention looks (issue 7)
        metrics.update(sort_of_clevr_pointing(model, data))
    metrics["checkpoint"] = str(checkpoint)
    metrics["kind"] = model.config.kind
    metrics["trained_steps"] = meta.get("step")
    return metrics


def _pct(x: float) -> str:
    return "   n/a" if math.isnan(x) else f"{100 * x:6.2f}%"


def format_table(metrics: dict[str, Any], *, source: str) -> str:
    """The paper's table (and per subtype) as text."""
    lines = [
        f"Sort-of-CLEVR: {metrics['num_questions']} questions ({source})",
        "",
        f"{'model':<34} {'non-relational':>14} {'relational':>11}",
        f"{'xmodal ' + metrics.get('kind', ''):<34} {_pct(metrics['non_relational']):>14} "
        f"{_pct(metrics['relational']):>11}",
    ]
    lines += [f"{name:<34} {nr:>14} {r:>11}" for name, nr, r in PUBLISHED]
    lines += ["", "per subtype:"]
    for r, names in enumerate(SUBTYPE_NAMES):
        kind = "relational" if r else "non-relational"
        cells = "  ".join(f"{n} {_pct(metrics['per_subtype'][n])}" for n in names)
        lines.append(f"  {kind:<15} {cells}")
    if "pointing_game" in metrics:
        lines += [
            "",
            f"pointing game ({metrics['pointing_game_choice']}): "
            f"{_pct(metrics['pointing_game'])} (chance {_pct(metrics['pointing_game_chance'])}, "
            f"object area {_pct(metrics['pointing_game_area_fraction'])})",
        ]
        table = metrics.get("pointing_game_table", {})
        per_map = [  # per layer and rolled out, the colour word's map with heads averaged
            f"{key.split('/')[0]} {_pct(value).strip()}"
            for key, value in table.items()
            if key.endswith("/color/mean")
        ]
        if per_map:
            lines.append("  colour word, heads averaged: " + "  ".join(per_map))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint()
    if args.data is not None:
        data = SortOfClevr.load(args.data)
        source = str(args.data)
    else:
        data = generate(args.images, seed=args.seed)
        source = f"{args.images} fresh images, seed {args.seed}"
    metrics = compute_metrics(checkpoint, data)
    print(format_table(metrics, source=source))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    return 0
