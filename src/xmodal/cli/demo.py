"""``xmodal demo``: the trained Sort-of-CLEVR model answers questions about fresh scenes.

With no arguments it loads the checkpoint shipped inside the package, generates fresh scenes,
answers their 20 questions each, prints the paper's table and a few question/answer examples,
and writes figures (the scenes with a question each, and where the question's words looked).
``xmodal demo --notebook`` runs the seed notebook's example instead.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import torch

from xmodal.attention import CrossModalAttention
from xmodal.checkpoint import save_figure

DEMO_SEED = 4242
"""Seed of the demo's fresh scenes (no training config uses it)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the trained Sort-of-CLEVR model answers questions about fresh scenes",
        description=(
            "Load the Sort-of-CLEVR VQA model shipped with xmodal, generate fresh scenes, "
            "answer their questions, print the paper's table and examples, and write figures. "
            "--notebook runs the seed notebook's example instead: simulated text features "
            "(4 samples x 20 tokens x 256) attend to image features (4 x 196 patches x 256)."
        ),
    )
    p.add_argument(
        "--notebook", action="store_true", help="run the seed notebook's shape example instead"
    )
    p.add_argument("--checkpoint", default=None, help="a model.safetensors (default: shipped)")
    p.add_argument("--images", type=int, default=200, help="fresh scenes to answer (default 200)")
    p.add_argument("--examples", type=int, default=8, help="questions to print (default 8)")
    p.add_argument(
        "--out", default="xmodal_demo", help="folder for the figures (default xmodal_demo)"
    )
    p.add_argument("--no-figures", action="store_true", help="do not write figures")
    p.add_argument("--seed", type=int, default=None, help="random seed (scenes; notebook: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.notebook:
        return run_notebook(args)
    return run_sort_of_clevr(args)


def run_sort_of_clevr(args: argparse.Namespace) -> int:
    from xmodal.cli.eval import format_table, shipped_checkpoint
    from xmodal.data.sort_of_clevr import ANSWERS, generate
    from xmodal.training import accuracy_table, load_model, predict

    checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint()
    if not checkpoint.exists():
        print(
            f"no checkpoint at {checkpoint}; train one with `xmodal train --config "
            f"configs/sort_of_clevr.toml`, or run `xmodal demo --notebook`"
        )
        return 1
    seed = DEMO_SEED if args.seed is None else args.seed
    model, meta = load_model(checkpoint)
    data = generate(args.images, seed=seed)
    predictions = predict(model, data)
    metrics = accuracy_table(data, predictions)
    metrics["kind"] = model.config.kind
    print(
        f"model: {checkpoint.name}, {model.num_parameters():,} parameters, "
        f"trained {meta.get('step', '?')} steps ({meta.get('wall_s', 0) / 60:.0f} min)"
    )
    print(format_table(metrics, source=f"{args.images} fresh scenes, seed {seed}"))
    print("\nexamples:")
    for j in range(min(args.examples, len(data))):
        k = (j * 7) % len(data)  # a spread of subtypes
        ok = "ok " if predictions[k] == data.answers[k] else "WRONG"
        print(
            f"  [{ok}] image {data.image_index[k]}: {data.question_text[k]} -> "
            f"{ANSWERS[predictions[k]]} (truth: {ANSWERS[data.answers[k]]})"
        )
    if not args.no_figures:
        try:
            paths = write_figures(model, data, predictions, Path(args.out))
        except ImportError:
            print("\n(matplotlib is not installed: no figures; pip install 'xmodal[viz]')")
        else:
            print("\nfigures: " + ", ".join(str(p) for p in paths))
    return 0


def write_figures(
    model: torch.nn.Module, data: object, predictions: object, out: Path
) -> list[Path]:
    """Scenes with a question each, and three questions' cross-attention over their scenes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from xmodal.data.sort_of_clevr import ANSWERS, SortOfClevr, encode_words, tokenize

    assert isinstance(data, SortOfClevr)
    preds = np.asarray(predictions)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    n = min(8, data.num_images)
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(2.6 * ((n + 1) // 2), 6.2))
    for j, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if j >= n:
            continue
        k = j * 20 + 10 + (j % 10)  # one relational question per scene
        ax.imshow(data.images[j])
        mark = "" if preds[k] == data.answers[k] else " (wrong)"
        q = textwrap.fill(str(data.question_text[k]), 30)
        ax.set_title(f"{q}\n→ {ANSWERS[preds[k]]}{mark}", fontsize=7)
    fig.tight_layout()
    paths.append(out / "scenes.png")
    save_figure(fig, paths[-1], dpi=110)
    plt.close(fig)

    blocks = getattr(model, "cross_blocks", None)
    if blocks:
        from xmodal.attention_maps import fuse_heads, record_attention
        from xmodal.models.vqa import VQAModel, images_to_tensor
        from xmodal.plotting import plot_token_heatmaps

        # One non-relational question (it names one object) in each of the first three scenes,
        # through the last cross-attention layer: the layer that finds the named object
        # (docs/inspect.md, pointing game).
        last = len(blocks) - 1
        name = f"cross_blocks.{last}.attn"
        assert isinstance(model, VQAModel)
        grid = model.config.grid
        step = int(np.prod(model.config.stem_strides))
        extent = (-step / 2, grid[1] * step - step / 2, grid[0] * step - step / 2, -step / 2)
        for scene in range(min(3, data.num_images)):
            k = scene * 20 + scene  # questions 0-9 of a scene are non-relational
            text = str(data.question_text[k])
            words = torch.from_numpy(encode_words([text])).view(1, 1, -1)
            image = data.images[scene : scene + 1]
            with torch.no_grad(), record_attention(model, names=[name]) as maps:
                model(images_to_tensor(image), words)
            weights = fuse_heads(maps[name])[0]  # (t, i)
            tokens = tokenize(text)
            fig = plot_token_heatmaps(
                data.images[scene],
                weights[: len(tokens)],
                tokens,
                grid=grid,
                extent=extent,
                title=f"{text} → {ANSWERS[preds[k]]} (cross-attention layer {last}, heads "
                "averaged)",
            )
            paths.append(out / f"attention_{scene}.png")
            save_figure(fig, paths[-1])
            plt.close(fig)
    return paths


# What CrossModalAttention.which_path's answers mean, for the demo's output.
_PATHS = {
    "absorbed": "absorbed K/V projections (short text: no keys or values computed)",
    "sdpa": "torch.nn.functional.scaled_dot_product_attention",
    "math": "matmul, softmax, matmul (bf16 training on CPU)",
}


def run_notebook(args: argparse.Namespace) -> int:
    torch.manual_seed(0 if args.seed is None else args.seed)
    cross_attention = CrossModalAttention(embed_dim=256, num_heads=8).eval()
    text_features = torch.randn(4, 20, 256)  # 4 samples, 20 text tokens
    image_features = torch.randn(4, 196, 256)  # 4 samples, 196 image patches (14x14)

    with torch.inference_mode():
        attended, weights = cross_attention(text_features, image_features)
        assert weights is not None
        print(f"Cross-modal attention output shape: {attended.shape}")
        print(f"Attention weights shape: {weights.shape}")
        print("  path: explicit (need_weights=True, float32 softmax; the notebook's default)")

        fused, none = cross_attention(text_features, image_features, need_weights=False)
        diff = (fused - attended).abs().max().item()
        print(f"Fused output shape: {fused.shape}, weights: {none}")
        path = cross_attention.which_path(text_features, image_features, need_weights=False)
        print(f"  path: fused (need_weights=False): {_PATHS[path]}")
        print(f"  max |fused - explicit| = {diff:.2e}")

        # A (batch, image_len) key-padding mask: the last 36 patches of sample 0 are padding.
        mask = torch.ones(4, 196, dtype=torch.bool)
        mask[0, 160:] = False
        _, masked = cross_attention(text_features, image_features, mask)
        assert masked is not None
        print(
            f"With a (4, 196) padding mask: weight on padded patches = "
            f"{masked[0, ..., 160:].sum().item():.1f}, rows sum to "
            f"{masked.sum(-1).mean().item():.4f}"
        )
    return 0
