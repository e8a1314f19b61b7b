"""``nn.MultiheadAttention`` <-> ``CrossModalAttention``: outputs, exact round trip, errors.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``D`` text width,
``E`` image width (``kdim`` = ``vdim``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xmodal import CrossModalAttention
from xmodal.interop import (
    ConversionError,
    from_torch_mha,
    keep_mask_from_torch_mha,
    to_torch_mha,
)

B, T, I, D, H = 2, 5, 7, 16, 4  # noqa: E741 (I = image tokens, as in the legend)

# float64: both sides do the same arithmetic in a different order, so agreement is at the level
# of a few ulps times the reduction length; float32 gets the same bound scaled to its epsilon.
TOL = {torch.float64: {"atol": 1e-12, "rtol": 1e-10}, torch.float32: {"atol": 2e-6, "rtol": 1e-5}}


def _masks(b: int, t: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MHA-style masks (True = ignore) that leave every query at least one key."""
    key_padding = torch.zeros(b, i, dtype=torch.bool)
    key_padding[0, -2:] = True  # row 0: the last two image tokens are padding
    attn_mask = torch.rand(t, i) > 0.6
    attn_mask[:, 0] = False  # key 0 is never padded: every query keeps one key
    return key_padding, attn_mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kdim", [None, 12], ids=["kdim=D", "kdim=12"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_from_torch_mha_matches_outputs_and_weights(
    dtype: torch.dtype, kdim: int | None, bias: bool, batch_first: bool
) -> None:
    mha = nn.MultiheadAttention(
        D, H, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first, dtype=dtype
    ).eval()
    if bias:  # PyTorch initialises the biases to zero, which would hide a mis-split bias
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    attn = from_torch_mha(mha)
    e = kdim or D
    text = torch.randn(B, T, D, dtype=dtype)
    image = torch.randn(B, I, e, dtype=dtype)
    key_padding, attn_mask = _masks(B, T, I)

    def call(q: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)  # (t, b, D), (i, b, E)
        out, w = mha(
            q,
            kv,
            kv,
            key_padding_mask=key_padding,
            attn_mask=attn_mask,
            average_attn_weights=False,
        )
        return (out if batch_first else out.transpose(0, 1)), w

    expected, expected_w = call(text, image)
    keep = keep_mask_from_torch_mha(key_padding, attn_mask)
    got, got_w = attn(text, image, keep, need_weights=True)
    fused, _ = attn(text, image, keep, need_weights=False)
    torch.testing.assert_close(fused, expected, **TOL[dtype])
    # The explicit path takes its softmax in float32 whatever the input dtype (attention.attend).
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    torch.testing.assert_close(got_w, expected_w, **TOL[torch.float32])
    assert attn.image_dim == e
    assert (attn.text_query.bias is not None) == bias
    assert attn.text_query.weight.dtype == dtype


@pytest.mark.parametrize("kdim", [None, 12], ids=["packed", "separate"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_round_trip_is_exact(kdim: int | None, bias: bool) -> None:
    mha = nn.MultiheadAttention(D, H, bias=bias, kdim=kdim, vdim=kdim, batch_first=True)
    if bias:
        with torch.no_grad():
            mha.in_proj_bias.normal_()
    back = to_torch_mha(from_torch_mha(mha))
    assert (back.kdim, back.vdim, back._qkv_same_embed_dim) == (
        mha.kdim,
        mha.vdim,
        mha._qkv_same_embed_dim,
    )
    ours, theirs = back.state_dict(), mha.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_round_trip_from_xmodal_is_exact() -> None:
    attn = CrossModalAttention(D, H, image_dim=10, dropout=0.25)
    again = from_torch_mha(to_torch_mha(attn))
    assert again.dropout.p == 0.25
    for key, value in attn.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_converted_module_keeps_mode_and_owns_its_weights() -> None:
    mha = nn.MultiheadAttention(D, H, dropout=0.1, batch_first=True).train()
    attn = from_torch_mha(mha)
    assert attn.training
    assert attn.dropout.p == pytest.approx(0.1)
    with torch.no_grad():
        attn.text_query.weight.zero_()
    assert mha.in_proj_weight.abs().sum() > 0  # a copy, not a view of the original


def test_query_with_no_key_differs_as_documented() -> None:
    """A query whose keys are all masked: MHA's weights path gives NaN, xmodal a zero context.

    (MHA's ``need_weights=False`` path goes through SDPA, whose answer for such a row depends
    on the PyTorch version, so it is not pinned here.)
    """
    mha = nn.MultiheadAttention(D, H, batch_first=True).eval()
    with torch.no_grad():
        mha.out_proj.bias.normal_()
    attn = from_torch_mha(mha)
    text, image = torch.randn(1, T, D), torch.randn(1, I, D)
    attn_mask = torch.zeros(T, I, dtype=torch.bool)
    attn_mask[0] = True  # query 0 may see nothing
    theirs, _ = mha(text, image, image, attn_mask=attn_mask, need_weights=True)
    keep = keep_mask_from_torch_mha(attn_mask=attn_mask)
    assert torch.isnan(theirs[0, 0]).all()
    for need_weights in (False, True):
        ours, _ = attn(text, image, keep, need_weights=need_weights)
        torch.testing.assert_close(ours[0, 0], attn.output_proj.bias.detach())
        torch.testing.assert_close(ours[0, 1:], theirs[0, 1:])


def test_keep_mask_from_torch_mha_conventions() -> None:
    kp = torch.tensor([[False, True, False]])
    assert torch.equal(keep_mask_from_torch_mha(kp), ~kp)
    additive = torch.tensor([[0.0, float("-inf"), 0.0]])
    assert torch.equal(keep_mask_from_torch_mha(additive), ~kp)
    per_head = torch.zeros(2 * 3, 4, 5, dtype=torch.bool)  # (b·h, t, i) with b=2, h=3
    per_head[4, 1, 2] = True  # b=1, h=1
    keep = keep_mask_from_torch_mha(attn_mask=per_head, num_heads=3)
    assert keep.shape == (2, 3, 4, 5)
    assert not keep[1, 1, 1, 2]
    assert int((~keep).sum()) == 1
    assert keep_mask_from_torch_mha() is None


def test_keep_mask_from_torch_mha_rejects_bias_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"key_padding_mask is an additive float mask"):
        keep_mask_from_torch_mha(torch.tensor([[0.0, -1.0]]))
    with pytest.raises(ValueError, match=r"num_heads is required"):
        keep_mask_from_torch_mha(attn_mask=torch.zeros(6, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"not a multiple of num_heads=4"):
        keep_mask_from_torch_mha(attn_mask=torch.zeros(6, 2, 3, dtype=torch.bool), num_heads=4)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(t, i\) or \(b·h, t, i\)"):
        keep_mask_from_torch_mha(attn_mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"attn_mask must be boolean or floating point"):
        keep_mask_from_torch_mha(attn_mask=torch.zeros(2, 3, dtype=torch.long))


def test_from_torch_mha_rejects_what_xmodal_cannot_express() -> None:
    with pytest.raises(TypeError, match=r"mha must be an nn.MultiheadAttention, got Linear"):
        from_torch_mha(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"kdim=8 and vdim=12.*needs kdim == vdim"):
        from_torch_mha(nn.MultiheadAttention(D, H, kdim=8, vdim=12))
    with pytest.raises(ValueError, match=r"add_bias_kv=True"):
        from_torch_mha(nn.MultiheadAttention(D, H, add_bias_kv=True))
    with pytest.raises(ValueError, match=r"add_zero_attn=True"):
        from_torch_mha(nn.MultiheadAttention(D, H, add_zero_attn=True))


def test_to_torch_mha_rejects_what_mha_cannot_express() -> None:
    with pytest.raises(TypeError, match=r"attn must be a CrossModalAttention, got Linear"):
        to_torch_mha(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_kv_heads=2, num_heads=4"):
        to_torch_mha(CrossModalAttention(D, H, num_kv_heads=2))
    with pytest.raises(ValueError, match=r"qk_norm=True"):
        to_torch_mha(CrossModalAttention(D, H, qk_norm=True))
    with pytest.raises(ValueError, match=r"inner width num_heads \* head_dim = 32.*embed_dim = 16"):
        to_torch_mha(CrossModalAttention(D, H, head_dim=8))


def test_shape_mismatch_names_the_key_and_loads_nothing() -> None:
    mha = nn.MultiheadAttention(D, H, batch_first=True)
    mha.out_proj.weight = nn.Parameter(torch.zeros(D, D + 1))  # hand-edited, wrong shape
    with pytest.raises(ConversionError, match=r"out_proj.weight has shape \(16, 17\)") as info:
        from_torch_mha(mha)
    assert info.value.mismatched[0][0] == "output_proj.weight"
    assert "nothing was loaded" in str(info.value)
