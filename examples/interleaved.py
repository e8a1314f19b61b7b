"""Interleaved text and images through xmodal's Flamingo blocks.

Two rows of text with a different number of images each (one row left-padded), the images
resampled to a few latents each, a keep-mask built from where the ``<image>`` markers are, under
each media policy, and a stack of gated cross-attention blocks. For every token the script
prints the images its mask lets it see, and -- measured, by changing one image at a time and
watching which outputs move -- the images that actually reach it.

Run: ``python examples/interleaved.py`` (CPU, about a second; randomly initialised weights).
"""

from __future__ import annotations

import torch
from torch import nn

from xmodal import (
    MEDIA_POLICIES,
    GatedCrossAttentionBlock,
    PerceiverResampler,
    media_attention_mask,
    media_locations_from_ids,
)

TEXT_DIM, IMAGE_DIM = 32, 24  # text width D, image width E
PATCHES, LATENTS = (
    9,
    4,
)  # image tokens from the "vision encoder", latents per image after resampling

ROWS = [
    "<image> a cat sat . <image> <image> two dogs",  # 3 images: one, then a group of two
    "<pad> <pad> <pad> hello there <image> a bird .",  # 1 image, left padding
]


def main() -> None:
    torch.manual_seed(0)
    words = [row.split() for row in ROWS]
    vocab = {w: k for k, w in enumerate(sorted({w for row in words for w in row}))}
    input_ids = torch.tensor([[vocab[w] for w in row] for row in words])  # (b, t)
    locations = media_locations_from_ids(input_ids, vocab["<image>"])  # (b, t) bool
    num_media = int(locations.sum(-1).max())  # media slots; rows with fewer images pad

    # Stand-ins for a vision encoder's output: (b, m, patches, E); row 1 uses one slot of three.
    images = torch.randn(len(ROWS), num_media, PATCHES, IMAGE_DIM)

    embed = nn.Embedding(len(vocab), TEXT_DIM)
    resampler = PerceiverResampler(
        IMAGE_DIM, depth=2, num_latents=LATENTS, num_heads=2, head_dim=12, max_num_media=num_media
    )
    # gate_init=0.5 so the untrained blocks are not the identity and the effect is visible.
    blocks = nn.ModuleList(
        GatedCrossAttentionBlock(TEXT_DIM, IMAGE_DIM, num_heads=4, head_dim=8, gate_init=0.5)
        for _ in range(2)
    )

    def run(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        media = resampler(images)  # (b, m, LATENTS, E)
        x = embed(input_ids)  # (b, t, D)
        for block in blocks:  # in a real model, frozen LM layers sit between these
            x = block(x, media, mask)
        return x

    with torch.no_grad():
        for policy in MEDIA_POLICIES:
            mask = media_attention_mask(locations, LATENTS, num_media=num_media, policy=policy)
            base = run(images, mask)
            # Which images reach each token: change image k, see which outputs change.
            reached = torch.zeros(len(ROWS), input_ids.shape[1], num_media, dtype=torch.bool)
            for k in range(num_media):
                changed = images.clone()
                changed[:, k] = torch.randn_like(changed[:, k])
                reached[..., k] = (run(changed, mask) != base).any(-1)
            allowed = mask.reshape(*mask.shape[:2], num_media, LATENTS).any(-1)  # (b, t, m)

            print(f"\npolicy = {policy!r}")
            for row, tokens in enumerate(words):
                print(f"  row {row}: {ROWS[row]}")
                for t, token in enumerate(tokens):
                    see = _images(allowed[row, t])
                    got = _images(reached[row, t])
                    note = "" if see == got else "   <-- differs from the mask!"
                    print(f"    {token:>8}  mask allows {see:<14} reached by {got}{note}")


def _images(flags: torch.Tensor) -> str:
    found = [f"img{k}" for k in torch.nonzero(flags).flatten().tolist()]
    return ",".join(found) if found else "-"


if __name__ == "__main__":
    main()
