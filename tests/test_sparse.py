"""Block-sparse media attention (flex_attention) equals the dense masked path.

The fast tests run eager flex (``compiled=False``, a reference implementation that is cheap at
these sizes) -- they check the block masks and the semantics. The compiled kernel needs an
inductor compile per shape (seconds each) and is tested under ``slow``.

Tolerances: float32 throughout; the flex kernel and SDPA sum in different orders, so the
float32 defaults of ``assert_close`` (``1.3e-6`` relative, ``1e-5`` absolute) apply.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from xmodal import CrossModalAttention, attend, media_attention_mask
from xmodal.sparse import (
    FLEX_AVAILABLE,
    block_mask_from_keep_mask,
    flex_attend,
    media_block_mask,
    sparse_cross_attention,
)

pytestmark = pytest.mark.skipif(
    not FLEX_AVAILABLE, reason="needs torch.nn.attention.flex_attention"
)

D, E, H = 32, 24, 4
POLICIES = ["immediate", "all_previous", "grouped"]


def _interleaving(b: int, t: int, m: int, generator: torch.Generator) -> Tensor:
    """``(b, t)`` random marker positions: up to ``m`` images per row, sometimes adjacent."""
    locations = torch.zeros(b, t, dtype=torch.bool)
    for row in range(b):
        count = int(torch.randint(0, m + 1, (), generator=generator))
        positions = torch.randperm(t, generator=generator)[:count]
        locations[row, positions] = True
    locations[0, 1:3] = True  # a group of two adjacent images in row 0 ...
    locations[0, 3:] &= torch.arange(3, t) >= t // 2  # ... and m stays an upper bound
    return locations


def _module(num_kv_heads: int, qk_norm: bool) -> CrossModalAttention:
    return CrossModalAttention(
        D, H, image_dim=E, num_kv_heads=num_kv_heads, qk_norm=qk_norm, dropout=0.0
    ).eval()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("num_kv_heads", "qk_norm"), [(4, False), (2, True), (1, False)])
def test_flex_equals_dense_on_random_interleavings(
    policy: str, num_kv_heads: int, qk_norm: bool
) -> None:
    b, t, m, n = 3, 24, 4, 5
    module = _module(num_kv_heads, qk_norm)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        locations = _interleaving(b, t, m, g)
        text, media = torch.randn(b, t, D, generator=g), torch.randn(b, m * n, E, generator=g)
        dense_mask = media_attention_mask(locations, n, num_media=m, policy=policy)  # type: ignore[arg-type]
        want, _ = module(text, media, dense_mask, need_weights=False)
        block_mask = media_block_mask(locations, n, num_media=m, policy=policy, block_size=8)  # type: ignore[arg-type]
        with torch.no_grad():  # flex has no backward on CPU
            got = sparse_cross_attention(
                module, text, block_mask, image_features=media, compiled=False
            )
            kv = module.encode_image(media)  # and with a cache
            got_kv = sparse_cross_attention(module, text, block_mask, image_kv=kv, compiled=False)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_kv, want)


def test_media_block_mask_equals_the_dense_media_mask() -> None:
    g = torch.Generator().manual_seed(0)
    locations = _interleaving(2, 40, 5, g)
    for policy in POLICIES:
        dense = media_attention_mask(locations, 6, num_media=5, policy=policy)  # type: ignore[arg-type]
        block_mask = media_block_mask(locations, 6, num_media=5, policy=policy, block_size=16)  # type: ignore[arg-type]
        from_dense = block_mask_from_keep_mask(dense, block_size=16)
        assert block_mask.shape == from_dense.shape == (2, 1, 40, 30)
        # the same tiles are visited, full or partial
        assert torch.equal(block_mask.to_dense(), from_dense.to_dense())
        # and a tile is visited iff it holds a visible pair
        tiles = torch.nn.functional.pad(dense, (0, 2, 0, 8)).reshape(2, 3, 16, 2, 16)
        assert torch.equal(block_mask.to_dense()[:, 0].bool(), tiles.any(dim=(2, 4)))


def test_immediate_policy_skips_most_tiles() -> None:
    # 8 images of 16 tokens, one every 32 text tokens: with 16-wide tiles a text tile sees one
    # image tile of 8 -- 7/8 of the tiles are skipped.
    t, m, n = 256, 8, 16
    locations = torch.zeros(1, t, dtype=torch.bool)
    locations[0, ::32] = True
    block_mask = media_block_mask(locations, n, num_media=m, block_size=16)
    assert block_mask.sparsity() == pytest.approx(100 * 7 / 8)


@pytest.mark.parametrize("mask_shape", [(2, 10, 12), (1, 10, 12), (2, 4, 10, 12), (2, 1, 10, 12)])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_flex_attend_equals_attend_with_dense_keep_masks(
    mask_shape: tuple[int, ...], num_kv_heads: int
) -> None:
    q = torch.randn(2, 4, 10, 8)
    k, v = torch.randn(2, num_kv_heads, 12, 8), torch.randn(2, num_kv_heads, 12, 8)
    keep = torch.rand(mask_shape) < 0.3
    keep[..., 3, :] = False  # a query that sees nothing: zero context, as in attend
    got = flex_attend(q, k, v, block_mask_from_keep_mask(keep, block_size=4), compiled=False)
    want, _ = attend(q, k, v, keep[:, None] if keep.dim() == 3 else keep)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[:, :, 3], torch.zeros_like(got[:, :, 3]))


def test_numeric_keep_mask_is_read_as_non_zero() -> None:
    keep = (torch.rand(1, 6, 7) < 0.5).float() * 3.0
    a = block_mask_from_keep_mask(keep, block_size=2).to_dense()
    b = block_mask_from_keep_mask(keep != 0, block_size=2).to_dense()
    assert torch.equal(a, b)


def _locs() -> Tensor:
    return torch.tensor([[True, False, False, True]])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: block_mask_from_keep_mask(torch.ones(4, 5)), ValueError,
         r"mask must have shape \(b\|1, t, i\) or \(b\|1, h\|1, t, i\), got rank 2 shape \(4, 5\)"),
        (lambda: block_mask_from_keep_mask([[True]]), TypeError,  # type: ignore[arg-type]
         r"mask must be a torch.Tensor, got list"),
        (lambda: block_mask_from_keep_mask(torch.ones(1, 2, 2), block_size=0), ValueError,
         r"block_size must be a positive int or None, got 0"),
        (lambda: media_block_mask(_locs(), 0), ValueError,
         r"tokens_per_media must be positive, got 0"),
        (lambda: media_block_mask(_locs(), 2.0), TypeError,  # type: ignore[arg-type]
         r"tokens_per_media must be an int, got float 2.0"),
        (lambda: media_block_mask(_locs(), 2, num_media=1), ValueError,
         r"media_locations has a row with 2 image markers, but num_media is 1"),
        (lambda: media_block_mask(_locs(), 2, policy="nearest"), ValueError,  # type: ignore[arg-type]
         r"policy must be one of"),
        (lambda: flex_attend(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8),
                             torch.randn(1, 2, 6, 8), torch.ones(1, 4, 6)), TypeError,
         r"block_mask must be a flex-attention BlockMask, got Tensor"),
        (lambda: flex_attend(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8),
                             torch.randn(1, 2, 6, 8), media_block_mask(_locs(), 3)), ValueError,
         r"block_mask has shape \(1, 1, 4, 6\), expected \(b\|1, h\|1, t, i\) with b=1, h=2, "
         r"t=5, i=6"),
        (lambda: flex_attend(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8),
                             torch.randn(1, 2, 5, 8), media_block_mask(_locs(), 3)), ValueError,
         r"block_mask has shape \(1, 1, 4, 6\), expected .* i=5"),
        (lambda: sparse_cross_attention(_module(4, False), torch.randn(1, 4, D),
                                        media_block_mask(_locs(), 3)), ValueError,
         r"pass exactly one of image_features and image_kv"),
        (lambda: sparse_cross_attention(
            CrossModalAttention(D, H, image_dim=E), torch.randn(1, 4, D),
            media_block_mask(_locs(), 3), image_features=torch.randn(1, 6, E)), ValueError,
         r"attn is in training mode with dropout=0.1; call attn.eval\(\)"),
        (lambda: flex_attend(torch.randn(1, 2, 4, 8, requires_grad=True), torch.randn(1, 2, 6, 8),
                             torch.randn(1, 2, 6, 8), media_block_mask(_locs(), 3)), RuntimeError,
         r"flex_attention has no backward on CPU: run the block-sparse path under "
         r"torch.no_grad\(\)"),
        (lambda: sparse_cross_attention(
            _module(4, False), torch.randn(1, 4, D), media_block_mask(_locs(), 3),
            image_kv=_module(2, False).encode_image(torch.randn(1, 6, E))), ValueError,
         r"image_kv.key has shape \(1, 2, 6, 8\), expected \(b, k, i, d\) = "
         r"\(1, 4, 6, 8\)"),
        (lambda: sparse_cross_attention(torch.nn.Linear(2, 2), torch.randn(1, 4, D),  # type: ignore[arg-type]
                                        media_block_mask(_locs(), 3)), TypeError,
         r"attn must be a CrossModalAttention, got Linear"),
    ],
)  # fmt: skip
def test_errors_name_the_argument(call: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()  # type: ignore[operator]


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_compiled_flex_equals_dense_on_random_interleavings(policy: str) -> None:
    # The real kernel: an inductor compile per shape (several seconds on 2 cores).
    b, t, m, n = 2, 96, 4, 16
    module = _module(2, qk_norm=True)
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        locations = _interleaving(b, t, m, g)
        text, media = torch.randn(b, t, D, generator=g), torch.randn(b, m * n, E, generator=g)
        dense_mask = media_attention_mask(locations, n, num_media=m, policy=policy)  # type: ignore[arg-type]
        want, _ = module(text, media, dense_mask, need_weights=False)
        block_mask = media_block_mask(locations, n, num_media=m, policy=policy, block_size=16)  # type: ignore[arg-type]
        with torch.no_grad():
            got = sparse_cross_attention(module, text, block_mask, image_features=media)
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_flex_inside_compiled_module_fullgraph() -> None:
    module = _module(2, qk_norm=False)
    locations = torch.zeros(1, 64, dtype=torch.bool)
    locations[0, ::16] = True
    block_mask = media_block_mask(locations, 16, num_media=4, block_size=16)
    text, media = torch.randn(1, 64, D), torch.randn(1, 64, E)

    def run(text: Tensor, media: Tensor) -> Tensor:
        return sparse_cross_attention(module, text, block_mask, image_features=media)

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(run, fullgraph=True)(text, media)
    want, _ = module(
        text, media, media_attention_mask(locations, 16, num_media=4), need_weights=False
    )
    torch.testing.assert_close(got, want)
