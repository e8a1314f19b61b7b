"""``xmodal demo``: the seed notebook's example, run through xmodal."""

from __future__ import annotations

import argparse

import torch

from xmodal.attention import CrossModalAttention


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the notebook's example: 4x20 text tokens attend to 4x196 image patches",
        description=(
            "Run the seed notebook's example through xmodal.CrossModalAttention: simulated text "
            "features (4 samples x 20 tokens x 256) attend to image features (4 x 196 patches x "
            "256). Prints the output and weight shapes and which attention path ran."
        ),
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
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
        print(
            "  path: fused (need_weights=False, torch.nn.functional.scaled_dot_product_attention)"
        )
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
