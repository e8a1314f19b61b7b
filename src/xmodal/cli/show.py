"""``xmodal show``: one Sort-of-CLEVR scene, a question, the answer, and where each word looked."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from xmodal.attention_maps import HeadFusion
from xmodal.checkpoint import save_figure

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "show",
        help="draw where each question word looked in a Sort-of-CLEVR scene",
        description=(
            "Render one Sort-of-CLEVR scene (generated from --seed), ask the trained model a "
            "question about it, and save a PNG with the model's answer and confidence and, for "
            "each question word, its cross-attention over the image."
        ),
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="model.safetensors from `xmodal train` (default: the checkpoint shipped in the "
        "package, as for `xmodal eval`)",
    )
    p.add_argument("--seed", type=int, default=0, help="scene seed (default: 0)")
    p.add_argument(
        "--question",
        default=None,
        help='question in words, e.g. "What is the shape of the red object?" (default: the '
        "scene's --index-th generated question)",
    )
    p.add_argument(
        "--index",
        type=int,
        default=0,
        help="which of the scene's 20 generated questions (0-9 non-relational, 10-19 "
        "relational; default: 0); ignored with --question",
    )
    p.add_argument(
        "--layer",
        default="0",
        help="cross-attention layer to draw (0, 1, ...) or 'rollout' (default: 0)",
    )
    p.add_argument(
        "--heads", default="mean", help="head fusion: mean, max or a head index (default: mean)"
    )
    p.add_argument(
        "--scale",
        choices=("token", "shared"),
        default="token",
        help="colour scale: each word's own maximum (token, default) or one for all words",
    )
    p.add_argument("--out", default="show.png", help="PNG to write (default: show.png)")
    p.add_argument(
        "--heads-out",
        default=None,
        help="also write a tokens x heads grid of the chosen layer (layer 0 for rollout) here",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from xmodal.attention_maps import (
        fuse_heads,
        record_attention,
        record_mha_attention,
        rollout,
    )
    from xmodal.cli.eval import shipped_checkpoint
    from xmodal.data.sort_of_clevr import (
        ANSWERS,
        COLOR_NAMES,
        OBJECT_SIZE,
        QUESTIONS_PER_IMAGE,
        VOCAB,
        encode_words,
        generate,
        tokenize,
    )
    from xmodal.models.vqa import images_to_tensor
    from xmodal.plotting import plot_heads_grid, plot_token_heatmaps
    from xmodal.pointing import stem_patch_centers, text_self_attention
    from xmodal.training import load_model

    checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint()
    if not checkpoint.is_file():
        print(f"error: no checkpoint at {checkpoint}; pass --checkpoint PATH", file=sys.stderr)
        return 2
    model, _ = load_model(checkpoint, device=args.device)
    if not len(getattr(model, "cross_blocks", [])):
        print(
            f"error: {checkpoint} holds a {model.config.kind!r} model, which has no "
            f"cross-attention to show; use a 'flamingo' model",
            file=sys.stderr,
        )
        return 2
    heads: HeadFusion
    if args.heads.lstrip("-").isdigit():
        heads = int(args.heads)
    elif args.heads in ("mean", "max"):
        heads = args.heads
    else:
        print(
            f"error: --heads must be mean, max or a head index, got {args.heads!r}", file=sys.stderr
        )
        return 2
    num_layers = len(model.cross_blocks)
    if args.layer != "rollout" and not (args.layer.isdigit() and int(args.layer) < num_layers):
        print(
            f"error: --layer must be 'rollout' or a layer index in 0..{num_layers - 1}, got "
            f"{args.layer!r}",
            file=sys.stderr,
        )
        return 2

    scene = generate(1, seed=args.seed)
    truth = None
    if args.question is None:
        if not 0 <= args.index < QUESTIONS_PER_IMAGE:
            print(f"error: --index must be in 0..{QUESTIONS_PER_IMAGE - 1}", file=sys.stderr)
            return 2
        question = str(scene.question_text[args.index])
        truth = ANSWERS[int(scene.answers[args.index])]
    else:
        question = args.question
    words = tokenize(question)[: model.config.max_words]
    unknown = [w for w in words if w not in VOCAB]
    if unknown:
        print(f"warning: words the model never saw: {unknown}", file=sys.stderr)

    images = images_to_tensor(scene.images[:1]).to(args.device)  # (1, 3, H, W)
    ids = torch.as_tensor(encode_words([question], length=model.config.max_words))
    questions = ids.to(args.device)[:, None, :]  # (1, 1, t)
    names = [f"cross_blocks.{k}.attn" for k in range(num_layers)]
    self_modules = text_self_attention(model)
    with (
        torch.no_grad(),
        record_attention(model, names=names, device="cpu") as maps,
        record_mha_attention(self_modules) as self_maps,
    ):
        logits = model(images, questions)  # (1, 1, a)
    probs = torch.softmax(logits[0, 0].float(), dim=-1)
    answer = ANSWERS[int(probs.argmax())]
    confidence = float(probs.max())

    layer_maps = [fuse_heads(maps[n], heads) for n in names]  # each (1, t, i)
    if args.layer == "rollout":
        chosen = rollout(layer_maps, self_maps=[s.cpu() for s in self_maps[:num_layers]])
    else:
        chosen = layer_maps[int(args.layer)]
    token_maps = chosen[0, : len(words)]  # (t_words, i)

    box = None
    colors = [w for w in words if w in COLOR_NAMES]
    if colors and scene.object_center is not None:
        x, y = (int(v) for v in scene.object_center[0, COLOR_NAMES.index(colors[0])])
        box = (x - OBJECT_SIZE, y - OBJECT_SIZE, x + OBJECT_SIZE + 1, y + OBJECT_SIZE + 1)
    step = int(np.prod(model.config.stem_strides))
    gh, gw = model.config.grid
    centers = stem_patch_centers(tuple(model.config.stem_strides), (gh, gw))
    extent = (
        float(centers[0, 0]) - step / 2,
        float(centers[-1, 0]) + step / 2,
        float(centers[-1, 1]) + step / 2,
        float(centers[0, 1]) - step / 2,
    )
    title = f"Q: {question}   A: {answer} ({confidence:.0%})"
    if truth is not None:
        title += f"   truth: {truth}"
    where = "rollout" if args.layer == "rollout" else f"layer {args.layer}"
    title += f"   [{where}, heads {heads}]"
    fig = plot_token_heatmaps(
        scene.images[0],
        token_maps,
        words,
        grid=(gh, gw),
        extent=extent,
        box=box,
        title=title,
        scale=args.scale,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out)
    print(f"{question} -> {answer} ({confidence:.1%})" + (f", truth {truth}" if truth else ""))
    print(f"wrote {out}")
    if args.heads_out:
        layer = 0 if args.layer == "rollout" else int(args.layer)
        weights = maps[names[layer]][0, :, : len(words)]  # (h, t_words, i)
        grid_fig = plot_heads_grid(weights, words, grid=(gh, gw))
        grid_fig.suptitle(f"layer {layer}: {question}", fontsize=8)
        heads_out = Path(args.heads_out)
        heads_out.parent.mkdir(parents=True, exist_ok=True)
        save_figure(grid_fig, heads_out)
        print(f"wrote {heads_out}")
    return 0
