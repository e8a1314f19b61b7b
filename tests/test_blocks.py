"""GatedCrossAttentionBlock: zero-init identity, gating, pass-through of tokens without media."""

from __future__ import annotations

import pytest
import torch
from reference import flamingo as ref
from torch import nn

from xmodal import CrossModalAttention, FeedForward, GatedCrossAttentionBlock, TanhGate

D, E, H, HD = 16, 12, 4, 8


def _block(gate: float = 0.0, **kwargs: object) -> GatedCrossAttentionBlock:
    return GatedCrossAttentionBlock(
        D, E, num_heads=H, head_dim=HD, ff_mult=2, gate_init=gate, **kwargs
    )  # type: ignore[arg-type]


def test_fresh_block_is_the_identity_bit_exact() -> None:
    block = _block()
    text, media = torch.randn(2, 5, D), torch.randn(2, 3, E)
    out = block(text, media)
    assert torch.equal(out, text)


def test_open_gates_change_the_output() -> None:
    block = _block(gate=0.5)
    text, media = torch.randn(2, 5, D), torch.randn(2, 3, E)
    out = block(text, media)
    assert out.shape == text.shape
    assert not torch.allclose(out, text)
    # ...and the media matter
    assert not torch.allclose(out, block(text, torch.randn(2, 3, E)))


def test_tokens_without_media_pass_through_forward_and_backward() -> None:
    block = _block(gate=1.0)
    text = torch.randn(2, 4, D, requires_grad=True)
    media = torch.randn(2, 3, E)
    mask = torch.ones(2, 4, 3, dtype=torch.bool)
    mask[0, :2] = False  # row 0: tokens 0, 1 see no image
    mask[1] = False  # row 1: no image at all
    out = block(text, media, mask)
    blind = ~mask.any(-1)  # (b, t)
    assert torch.equal(out[blind], text[blind])
    assert not torch.allclose(out[~blind], text[~blind])

    # Backward: a loss on the blind tokens only reaches the text as the identity, and
    # reaches no parameter of the block.
    grad_out = torch.randn_like(out) * blind[..., None]
    out.backward(grad_out)
    assert text.grad is not None
    assert torch.equal(text.grad[blind], grad_out[blind])
    for name, p in block.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


def test_four_d_media_is_flattened_medium_major() -> None:
    block = _block(gate=0.7)
    text, media = torch.randn(2, 5, D), torch.randn(2, 3, 4, E)  # 3 media of 4 tokens
    mask = torch.rand(2, 5, 12) > 0.3
    torch.testing.assert_close(block(text, media, mask), block(text, media.reshape(2, 12, E), mask))


def test_image_kv_gives_the_same_output() -> None:
    block = _block(gate=0.7, num_kv_heads=2, qk_norm=True)
    text, media = torch.randn(2, 5, D), torch.randn(2, 2, 3, E)
    mask = torch.rand(2, 5, 6) > 0.3
    kv = block.encode_image(media)
    assert kv.num_kv_heads == 2
    torch.testing.assert_close(
        block(text, image_kv=kv, attention_mask=mask), block(text, media, mask)
    )
    assert block.num_kv_heads == 2
    assert block.qk_norm is True


def test_from_parts_uses_the_given_modules() -> None:
    attn = CrossModalAttention(D, 2, image_dim=E, head_dim=8, num_kv_heads=1, dropout=0.0)
    ff = FeedForward(D, activation="swiglu", hidden_dim=20, norm=nn.RMSNorm(D, eps=1e-5))
    norm = nn.RMSNorm(D, eps=1e-5)
    gate = TanhGate(0.2, dim=D)
    block = GatedCrossAttentionBlock.from_parts(attn=attn, ff=ff, norm=norm, attn_gate=gate)
    assert block.attn is attn
    assert block.ff is ff
    assert block.norm is norm
    assert block.attn_gate is gate
    assert block.ff_gate.dim is None
    assert float(block.ff_gate.alpha.detach()) == 0.0
    text, media = torch.randn(2, 3, D), torch.randn(2, 4, E)
    expected = text + gate(attn(norm(text), media, need_weights=False)[0])
    torch.testing.assert_close(block(text, media), expected)


def test_from_parts_without_feed_forward() -> None:
    attn = CrossModalAttention(D, 2, image_dim=E, dropout=0.0)
    block = GatedCrossAttentionBlock.from_parts(attn=attn, ff=None, attn_gate=TanhGate(1.0))
    text, media = torch.randn(1, 3, D), torch.randn(1, 4, E)
    expected = text + attn(block.norm(text), media)[0] * torch.tanh(torch.tensor(1.0))
    torch.testing.assert_close(block(text, media), expected)


def test_errors_name_the_argument() -> None:
    block = _block()
    text = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match=r"media must have shape \(b, i, E\) or \(b, m, n, E\)"):
        block(text, torch.randn(2, E))
    with pytest.raises(ValueError, match=r"text must have shape \(b, n, 16\)"):
        block(torch.randn(2, 5, 7), torch.randn(2, 3, E))
    with pytest.raises(ValueError, match="pass either media or image_kv, got neither"):
        block(text)
    with pytest.raises(ValueError, match="not both"):
        block(text, torch.randn(2, 3, E), image_kv=block.encode_image(torch.randn(2, 3, E)))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5, 4\)"):
        block(text, torch.randn(2, 3, E), torch.ones(2, 5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"gate_init must be a float, got str"):
        _block(gate="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ff_mult must be a positive number, got 0"):
        GatedCrossAttentionBlock(D, ff_mult=0)
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        _block(num_kv_heads=3)
    attn = CrossModalAttention(D, 2)
    with pytest.raises(ValueError, match=r"ff_gate is per-channel with dim=3"):
        GatedCrossAttentionBlock.from_parts(attn=attn, ff=None, ff_gate=TanhGate(dim=3))
    with pytest.raises(TypeError, match=r"attn must be a CrossModalAttention, got Linear"):
        GatedCrossAttentionBlock.from_parts(attn=nn.Linear(2, 2), ff=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("num_kv_heads", "qk_norm"), [(None, False), (2, True), (1, False)], ids=["mha", "gqa", "mqa"]
)
def test_matches_float64_reference(num_kv_heads: int | None, qk_norm: bool) -> None:
    block = _block(gate=0.8, num_kv_heads=num_kv_heads, qk_norm=qk_norm).double()
    with torch.no_grad():  # break the symmetry of the default LayerNorm affine
        block.norm.weight.normal_()
        block.norm.bias.normal_()
    text = torch.randn(3, 6, D, dtype=torch.float64)
    media = torch.randn(3, 2, 3, E, dtype=torch.float64)
    locations = torch.tensor(
        [[0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    mask = ref.media_mask(locations, 3, 2, "immediate")  # row 2 sees nothing
    expected = ref.gated_block(block, text, media.reshape(3, 6, E), mask)
    # float64 on both sides: agreement to ~1e-13; 1e-10 leaves room for summation order.
    torch.testing.assert_close(block(text, media, mask), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        block(text, media),
        ref.gated_block(block, text, media.reshape(3, 6, E), None),
        rtol=1e-10,
        atol=1e-10,
    )


def test_gradcheck_tiny() -> None:
    block = GatedCrossAttentionBlock(
        4, 3, num_heads=2, head_dim=2, ff_mult=1, gate_init=0.5
    ).double()
    text = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    media = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[[1, 0], [1, 1], [0, 0]], [[0, 1], [0, 0], [1, 1]]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda x, m: block(x, m, mask), (text, media), eps=1e-6, atol=1e-5
    )


def test_half_precision_runs_and_passes_blind_tokens_through() -> None:
    block = _block(gate=0.5).to(torch.bfloat16)
    text = torch.randn(2, 4, D, dtype=torch.bfloat16)
    media = torch.randn(2, 3, E, dtype=torch.bfloat16)
    mask = (
        torch.tensor([[0, 0, 1], [1, 1, 1]], dtype=torch.bool)[:, None, :].expand(2, 4, 3).clone()
    )
    mask[0, :2] = False
    out = block(text, media, mask)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :2], text[0, :2])


def test_compiles_fullgraph_with_mask() -> None:
    block = _block(gate=0.5)
    text, media = torch.randn(2, 4, D), torch.randn(2, 3, E)
    mask = torch.rand(2, 4, 3) > 0.5
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(text, media, mask), block(text, media, mask))


def test_key_padding_and_per_head_masks_decide_pass_through() -> None:
    block = _block(gate=0.5)
    text, media = torch.randn(2, 4, D), torch.randn(2, 3, E)
    padding = torch.tensor([[True, False, True], [False, False, False]])  # (b, i)
    out = block(text, media, padding)
    assert torch.equal(out[1], text[1])  # row 1 sees no image token at all
    torch.testing.assert_close(out[0], block(text, media, padding[:, None, :].expand(2, 4, 3))[0])
    per_head = torch.zeros(2, H, 4, 3, dtype=torch.bool)
    per_head[:, 0, 1:] = True  # only head 0 sees anything, and only from token 1 on
    out = block(text, media, per_head)
    assert torch.equal(out[:, 0], text[:, 0])
    assert not torch.allclose(out[:, 1:], text[:, 1:])


def test_no_image_tokens_at_all_is_the_identity() -> None:
    block = _block(gate=0.5)
    text = torch.randn(2, 3, D)
    assert torch.equal(block(text, torch.randn(2, 0, E)), text)
    assert torch.equal(block(text, torch.randn(2, 0, 4, E)), text)
