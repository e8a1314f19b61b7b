"""Train and evaluate the Sort-of-CLEVR VQA model: config, loop, resume, DDP, metrics.

Legend: ``b`` images per step (per process), ``q`` questions per image (20), ``t`` words per
question, ``a`` answers.

* :class:`RunConfig` (``[model]`` = :class:`~xmodal.models.vqa.VQAConfig`, ``[train]`` =
  :class:`TrainConfig`) is read from TOML by :func:`load_config`, with ``key=value`` overrides,
  and saved beside the run as ``config.toml``.
* :func:`train` runs the loop. Each step takes ``b`` images and asks all their questions; the
  image order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so a resumed run replays
  exactly the batches an uninterrupted one would. After each evaluation it writes (atomically)
  ``model.safetensors`` (weights + config + metrics in the header), ``train_state.pt``
  (optimizer and loop position, for ``resume=True``), ``metrics.csv`` and
  ``learning_curve.png``.
* Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel
  (gloo on CPU, nccl on GPU); each process takes every ``world``-th batch of the epoch's
  permutation, and process 0 evaluates and writes the files.
* :func:`predict` and :func:`accuracy_table` compute the paper's table; the CLI prints it.

The library logs; progress bars and printing live in ``xmodal.cli``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from xmodal.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_figure,
    save_training_state,
)
from xmodal.data.sort_of_clevr import (
    QUESTIONS_PER_IMAGE,
    SUBTYPE_NAMES,
    SortOfClevr,
    encode_words,
    generate,
)
from xmodal.models.vqa import (
    VQAConfig,
    VQAModel,
    cross_entropy,
    images_to_tensor,
    recalibrate_batchnorm,
)

__all__ = [
    "RunConfig",
    "TrainConfig",
    "accuracy_table",
    "evaluate",
    "load_config",
    "load_model",
    "predict",
    "train",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "model.safetensors"
STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.csv"
CONFIG_NAME = "config.toml"
CURVE_NAME = "learning_curve.png"
SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class TrainConfig:
    """The ``[train]`` table of a run config."""

    epochs: int = 20  # passes over the training images
    batch_images: int = 16  # images per step per process; all their questions are asked
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 200  # linear warm-up, then cosine decay to 0 at the last step
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    seed: int = 0  # model initialisation and batch order
    train_images: int = 9800  # training images generated from data_seed (published: 9800)
    val_images: int = 200  # validation images from val_seed (published test size: 200)
    data_seed: int = 0  # seed of the training set
    val_seed: int = 1  # seed of the validation set evaluated during training
    evals_per_epoch: int = 1  # evaluations (and checkpoints) per epoch
    calibration_images: int = 640  # training images that set BatchNorm statistics before evals
    time_limit_minutes: float = 0.0  # stop (evaluate, save) after this wall time; 0 = none
    threads: int = 0  # torch.set_num_threads; 0 = leave PyTorch's default
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    out_dir: str = "runs/sort_of_clevr"  # where checkpoints, metrics and plots go

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_images", "train_images", "val_images", "evals_per_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"train.{name} must be a positive int, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"train.device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: ``[model]`` and ``[train]`` tables."""

    model: VQAConfig = field(default_factory=VQAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        unknown = sorted(set(d) - {"model", "train"})
        if unknown:
            raise ValueError(f"unknown config table(s) {unknown}; expected [model] and [train]")
        train = dict(d.get("train", {}))
        known = {f.name for f in fields(TrainConfig)}
        bad = sorted(set(train) - known)
        if bad:
            raise ValueError(f"unknown train config key(s) {bad}; known: {sorted(known)}")
        return cls(model=VQAConfig.from_dict(dict(d.get("model", {}))), train=TrainConfig(**train))

    def to_toml(self) -> str:
        """The config as TOML (what ``config.toml`` beside a run holds)."""
        lines: list[str] = []
        for table, values in self.to_dict().items():
            lines.append(f"[{table}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML run config and apply ``table.key=value`` overrides (values parsed as TOML,
    falling back to a bare string: ``train.lr=3e-4``, ``model.kind=cnn_mlp``)."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    for item in overrides:
        key, sep, raw = item.partition("=")
        table, dot, name = key.strip().partition(".")
        if not sep or not dot or table not in ("model", "train") or not name:
            raise ValueError(f"override {item!r} must look like model.KEY=VALUE or train.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        data.setdefault(table, {})[name] = value
    return RunConfig.from_dict(data)


# ----------------------------------------------------------------------------------------------
# Data as tensors


@dataclass
class _Split:
    """A split as tensors. Grouped: ``images (n, 75, 75, 3)`` uint8, ``words (n, q, t)``,
    ``answers (n, q)``. Ungrouped splits use ``q = 1`` and repeat images per question."""

    images: Tensor
    words: Tensor
    answers: Tensor
    data: SortOfClevr


def _as_split(data: SortOfClevr) -> _Split:
    words = torch.from_numpy(encode_words(data.question_text))  # (N, t)
    answers = torch.from_numpy(data.answers)
    images = torch.from_numpy(data.images)
    if data.grouped_by_image():
        n, q = data.num_images, QUESTIONS_PER_IMAGE
        return _Split(images, words.view(n, q, -1), answers.view(n, q), data)
    index = torch.from_numpy(data.image_index)
    return _Split(images[index], words.unsqueeze(1), answers.unsqueeze(1), data)  # q = 1


# ----------------------------------------------------------------------------------------------
# Evaluation: predictions, then the table


@torch.no_grad()
def predict(
    model: nn.Module,
    data: SortOfClevr,
    *,
    batch_images: int = 50,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Answer indices ``(N,)`` for every question of ``data``, in ``data``'s order."""
    split = _as_split(data)
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    try:
        for start in range(0, len(split.images), batch_images):
            images = images_to_tensor(split.images[start : start + batch_images]).to(device)
            words = split.words[start : start + batch_images].to(device)
            out.append(model(images, words).argmax(-1).reshape(-1).cpu())  # (b·q,)
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def accuracy_table(data: SortOfClevr, predictions: np.ndarray) -> dict[str, Any]:
    """The paper's table as fractions in [0, 1].

    Returns:
        ``{"non_relational", "relational", "overall", "per_subtype": {"shape", "left",
        "top", "closest", "furthest", "count"}, "num_questions"}``.
    """
    predictions = np.asarray(predictions)
    if predictions.shape != data.answers.shape:
        raise ValueError(
            f"predictions must have shape {data.answers.shape} (one per question), got "
            f"{predictions.shape}"
        )
    correct = predictions == data.answers

    def frac(mask: np.ndarray) -> float:
        return float(correct[mask].mean()) if mask.any() else float("nan")

    per_subtype = {
        SUBTYPE_NAMES[r][s]: frac((data.relational == bool(r)) & (data.subtype == s))
        for r in (0, 1)
        for s in range(3)
    }
    return {
        "non_relational": frac(~data.relational),
        "relational": frac(data.relational),
        "overall": float(correct.mean()) if len(correct) else float("nan"),
        "per_subtype": per_subtype,
        "num_questions": len(correct),
    }


def evaluate(
    model: nn.Module, data: SortOfClevr, *, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """:func:`accuracy_table` of ``model``'s :func:`predict` ions on ``data``."""
    return accuracy_table(data, predict(model, data, device=device))


def load_model(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[VQAModel, dict[str, Any]]:
    """Rebuild a :class:`VQAModel` from a checkpoint; returns ``(model in eval mode, metadata)``."""
    state, metadata = load_checkpoint(path, device=device)
    config = metadata["config"]
    model_config = VQAConfig.from_dict(config.get("model", config))
    model = VQAModel(model_config).to(device)
    model.load_state_dict(state)
    return model.eval(), metadata


# ----------------------------------------------------------------------------------------------
# The loop


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(
    order: Tensor, step_in_epoch: int, *, rank: int, world: int, batch: int
) -> Tensor:
    """The images process ``rank`` of ``world`` trains on at ``step_in_epoch``.

    One step consumes ``world·batch`` consecutive entries of the epoch's ``order``; process
    ``r`` takes the ``r``-th slice of ``batch``. Together the processes see each image of the
    epoch at most once, and the union is what one process with ``world·batch`` would see.
    """
    start = (step_in_epoch * world + rank) * batch
    return order[start : start + batch]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _param_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


StepCallback = Callable[[dict[str, Any]], None]


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    on_step: StepCallback | None = None,
    on_eval: StepCallback | None = None,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Train a model as ``config`` says; returns a summary (also written as ``summary.json``).

    Args:
        config: the run.
        resume: continue from ``out_dir``'s ``model.safetensors`` + ``train_state.pt``; the
            remaining steps see the same batches, learning rates and hence losses as an
            uninterrupted run.
        on_step: called after every step with ``{"step", "total_steps", "epoch", "loss",
            "accuracy", "lr"}`` (the CLI's progress bar).
        on_eval: called after every evaluation with the metrics row.
        stop_at_step: stop after this global step, with an evaluation and checkpoint, as an
            interruption would (tests use it to check that ``resume`` continues exactly).

    Returns:
        ``{"final": metrics, "best_relational", "wall_s", "steps", "step_losses": {step: loss}
        for the steps run by this call, "replica_digests": [...] under DDP}``.
    """
    tc = config.train
    world, rank = 1, 0
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _resolve_device(tc.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
    main = rank == 0
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)

    out = Path(tc.out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG_NAME, config.to_toml())

    t0 = time.perf_counter()
    train_split = _as_split(generate(tc.train_images, seed=tc.data_seed))
    val_data = generate(tc.val_images, seed=tc.val_seed)
    n_train = len(train_split.images)
    per_step = tc.batch_images * world
    steps_per_epoch = n_train // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.train_images ({n_train}) is smaller than one step's images "
            f"(batch_images {tc.batch_images} x {world} processes)"
        )
    total_steps = tc.epochs * steps_per_epoch
    eval_every = max(1, steps_per_epoch // tc.evals_per_epoch)

    torch.manual_seed(tc.seed)
    model = VQAModel(config.model).to(device)
    # Weight decay on linear weights only: not on embeddings, norms, biases, nor on the conv
    # weights in front of BatchNorm (scale-invariant: decay would only raise their step size).
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    calibration = images_to_tensor(train_split.images[: tc.calibration_images]).to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": tc.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=tc.lr,
    )
    step, elapsed_before = 0, 0.0
    rows: list[dict[str, Any]] = []
    if resume:
        state_dict, meta = load_checkpoint(out / CHECKPOINT_NAME, device=device)
        model.load_state_dict(state_dict)
        state = load_training_state(out / STATE_NAME)
        if int(meta.get("step", -1)) != int(state["step"]):
            raise ValueError(
                f"{out / CHECKPOINT_NAME} is at step {meta.get('step')} but {out / STATE_NAME} "
                f"at step {state['step']} (a save was interrupted); cannot resume exactly"
            )
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before = int(state["step"]), float(state["wall_s"])
        rows = [dict(r) for r in state["metrics"]]
        if int(state["world_size"]) != world:
            raise ValueError(
                f"cannot resume a run of {state['world_size']} processes with {world}: the "
                f"batch order would differ"
            )
        logger.info("resumed %s at step %d of %d", out, step, total_steps)
    ddp: nn.Module = model
    if distributed:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    logger.info(
        "model %s: %d parameters; %d steps/epoch x %d epochs, %d process(es)",
        config.model.kind,
        model.num_parameters(),
        steps_per_epoch,
        tc.epochs,
        world,
    )

    def wall() -> float:  # seconds of this run, data generation included, across resumes
        return elapsed_before + time.perf_counter() - t0

    step_losses: dict[int, float] = {}
    running = [0.0, 0.0, 0]  # loss sum, correct, questions since the last evaluation
    stopped_early = False
    model.train()
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = _epoch_order(tc.seed, epoch, n_train)
        idx = batch_indices(order, in_epoch, rank=rank, world=world, batch=tc.batch_images)
        images = images_to_tensor(train_split.images[idx]).to(device, non_blocking=True)
        words = train_split.words[idx].to(device, non_blocking=True)
        answers = train_split.answers[idx].to(device, non_blocking=True)
        lr = _lr_at(step, total_steps, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = ddp(images, words)  # (b, q, a)
        loss = cross_entropy(logits, answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        step += 1
        loss_value = float(loss.detach())
        correct = int((logits.detach().argmax(-1) == answers).sum())
        step_losses[step] = loss_value
        running[0] += loss_value
        running[1] += correct
        running[2] += answers.numel()
        if on_step is not None and main:
            on_step(
                {
                    "step": step,
                    "total_steps": total_steps,
                    "epoch": epoch,
                    "loss": loss_value,
                    "accuracy": correct / answers.numel(),
                    "lr": lr,
                }
            )
        over_time = tc.time_limit_minutes > 0 and wall() > 60.0 * tc.time_limit_minutes
        over_time = over_time or (stop_at_step is not None and step >= stop_at_step)
        if distributed and tc.time_limit_minutes > 0:  # every process must stop together
            flag = torch.tensor([float(over_time)], device=device)
            dist.all_reduce(flag)
            over_time = bool(flag.item() > 0)
        if step % eval_every == 0 or step == total_steps or over_time:
            if (
                distributed
            ):  # BatchNorm running stats: take process 0's, as DDP's next forward would
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=0)
            n_steps = max(1, step - (rows[-1]["step"] if rows else 0))
            recalibrate_batchnorm(model, calibration)  # same on every process: same weights
            if main:
                metrics = evaluate(model, val_data, device=device)
                row = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "wall_s": round(wall(), 2),
                    "train_loss": round(running[0] / n_steps, 5),
                    "train_accuracy": round(running[1] / max(1, running[2]), 5),
                    "val_non_relational": round(metrics["non_relational"], 5),
                    "val_relational": round(metrics["relational"], 5),
                    **{f"val_{k}": round(v, 5) for k, v in metrics["per_subtype"].items()},
                }
                rows.append(row)
                logger.info(
                    "step %d (epoch %.2f, %.1f min): loss %.4f, val non-rel %.4f rel %.4f",
                    step,
                    row["epoch"],
                    row["wall_s"] / 60,
                    row["train_loss"],
                    row["val_non_relational"],
                    row["val_relational"],
                )
                _save_run(out, model, optimizer, config, rows, step, wall(), world)
                if on_eval is not None:
                    on_eval(row)
            else:
                rows.append({"step": step})  # keeps n_steps in step on every process
            running = [0.0, 0.0, 0]
            if distributed:
                dist.barrier()
            if over_time:
                stopped_early = step < total_steps
                break

    summary: dict[str, Any] = {
        "steps": step,
        "total_steps": total_steps,
        "stopped_early": stopped_early,
        "wall_s": round(wall(), 2),
        "step_losses": step_losses,
    }
    if main and rows:
        summary["final"] = rows[-1]
        summary["best_relational"] = max(r["val_relational"] for r in rows)
        summary["parameters"] = model.num_parameters()
    if distributed:
        digest = _param_digest(model)
        digests: list[Any] = [None] * world
        dist.all_gather_object(digests, digest)
        summary["replica_digests"] = digests
        summary["replicas_identical"] = len(set(digests)) == 1
    if main:
        atomic_write_text(
            out / SUMMARY_NAME,
            json.dumps({k: v for k, v in summary.items() if k != "step_losses"}, indent=2),
        )
    return summary


def _save_run(
    out: Path,
    model: VQAModel,
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    rows: list[dict[str, Any]],
    step: int,
    wall_s: float,
    world: int,
) -> None:
    """Write checkpoint, training state, metrics CSV and learning curve (process 0 only).

    The training state is written first, the weights last: if a crash falls between the two,
    ``resume`` sees a state at most one evaluation newer than the weights. Both carry ``step``,
    and a mismatch is refused on resume.
    """
    save_training_state(
        out / STATE_NAME,
        {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "wall_s": wall_s,
            "metrics": rows,
            "world_size": world,
        },
    )
    save_checkpoint(
        out / CHECKPOINT_NAME,
        model,
        config=config.to_dict(),
        metadata={"step": step, "wall_s": round(wall_s, 2), "metrics": rows[-1]},
    )
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[-1]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / METRICS_NAME, table.getvalue())
    try:
        plot_learning_curve(rows, out / CURVE_NAME)
    except ImportError:  # matplotlib is an optional extra
        logger.warning("matplotlib is not installed: no %s", CURVE_NAME)


def plot_learning_curve(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Validation accuracy against wall time (minutes): relational, non-relational, per subtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["wall_s"] / 60 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(minutes, [r["val_relational"] for r in rows], "o-", label="relational", lw=2)
    ax.plot(minutes, [r["val_non_relational"] for r in rows], "s-", label="non-relational", lw=2)
    for name in SUBTYPE_NAMES[1]:
        ax.plot(minutes, [r[f"val_{name}"] for r in rows], "--", lw=1, label=name)
    ax.axhline(0.94, color="gray", ls=":", lw=1, label="RN (paper) 94%")
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0.3, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
