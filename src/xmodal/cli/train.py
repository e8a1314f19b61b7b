"""``xmodal train``: train the Sort-of-CLEVR VQA model from a TOML config.

Runs :func:`xmodal.training.train` with a tqdm progress bar (loss and accuracy) and prints
each evaluation. The same command under ``torchrun --nproc_per_node=N`` trains with
DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from xmodal.training import load_config, train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the Sort-of-CLEVR VQA model (configs/sort_of_clevr.toml)",
        description=(
            "Train the Sort-of-CLEVR VQA model. Writes into the config's out_dir: "
            "config.toml (resolved), model.safetensors and train_state.pt (after every "
            "evaluation, atomically), metrics.csv, learning_curve.png, summary.json. "
            "Under torchrun it trains with DistributedDataParallel."
        ),
    )
    p.add_argument(
        "--config", required=True, help="TOML run config, e.g. configs/sort_of_clevr.toml"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override a config value (TOML syntax), e.g. --set train.epochs=2; repeatable",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in out_dir from its last checkpoint, exactly as if uninterrupted",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    bar: Any = None

    def on_step(info: dict[str, Any]) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(
                total=info["total_steps"], initial=info["step"] - 1, unit="step", file=sys.stderr
            )
        bar.update(1)
        bar.set_postfix(
            epoch=info["epoch"], loss=f"{info['loss']:.3f}", acc=f"{info['accuracy']:.3f}"
        )

    def on_eval(row: dict[str, Any]) -> None:
        line = (
            f"step {row['step']} epoch {row['epoch']:.2f} ({row['wall_s'] / 60:.1f} min): "
            f"val non-relational {row['val_non_relational']:.4f}, "
            f"relational {row['val_relational']:.4f}"
        )
        if bar is not None:
            bar.write(line)
        else:
            print(line, flush=True)

    summary = train(config, resume=args.resume, on_step=on_step, on_eval=on_eval)
    if bar is not None:
        bar.close()
    final = summary.get("final")
    if final is not None:
        print(
            f"done: {summary['steps']} steps in {summary['wall_s'] / 60:.1f} min; "
            f"val non-relational {final['val_non_relational']:.4f}, "
            f"relational {final['val_relational']:.4f}; files in {config.train.out_dir}"
        )
    if "replicas_identical" in summary and not summary["replicas_identical"]:
        print("error: DDP replicas ended with different weights", file=sys.stderr)
        return 1
    return 0
