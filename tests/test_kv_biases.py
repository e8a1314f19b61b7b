"""Key and value biases moved out of the K/V products (``CrossModalAttention._kv_biases_after``).

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` query heads, ``k`` key/value
heads, ``d`` head width, ``D`` text width, ``E`` image width.

The softmax cancels the key bias (``q·b_k`` is the same for every image token of a row), and a
visible row's probabilities sum to 1, so the value bias can be added to the ``h·t`` context rows
(``attend(value_bias=)``) instead of the ``k·i`` value rows. These tests check that both moves
give the reference answer and gradients, that they happen exactly where they should, and that
``attend``'s ``value_bias`` equals adding the bias to every value.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from reference.naive import reference_attention
from test_attention import MASKS, make_module
from torch import Tensor

from xmodal import CrossModalAttention, attend

# masks that leave rows with nothing to see, and one per query and head (the SDPA GQA layout)
MASK_NAMES = ["none", "pad_2d", "pad_2d_empty_element", "per_query_3d", "per_head_4d"]


def projected(module: CrossModalAttention) -> CrossModalAttention:
    """``module`` without the absorbed path, which would serve these short texts instead."""
    module.absorb_projections = False
    return module


def keep_biases_in_products(module: CrossModalAttention) -> CrossModalAttention:
    """A copy of ``module`` that projects with its own biases, as before the biases moved."""
    other = copy.deepcopy(module)
    other._kv_biases_after = lambda *args: (False, False)  # type: ignore[method-assign]
    return other


def kv_products(monkeypatch: pytest.MonkeyPatch, module: CrossModalAttention) -> list[bool]:
    """Record, for each ``F.linear`` that reads the image features, whether it added a bias."""
    seen: list[bool] = []
    original = F.linear
    image_weights = {id(module.image_key.weight), id(module.image_value.weight)}

    def spy(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if id(weight) in image_weights or weight.shape[0] == 2 * module.image_key.out_features:
            seen.append(bias is not None)
        return original(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    return seen


# --------------------------------------------------------------------------------------------
# Where the biases go
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "i", "k", "dropout", "want"),
    [
        (2, 12, None, 0.0, (True, True)),  # h·t = 8 < k·i = 48: the value bias to the context
        (12, 2, None, 0.0, (True, False)),  # h·t = 48 > 8: it stays with the values
        (3, 3, None, 0.0, (True, False)),  # a tie stays too
        (2, 12, None, 0.1, (True, False)),  # dropout: kept probabilities do not sum to 1
        (2, 12, 1, 0.0, (True, True)),  # MQA: h·t = 8 < k·i = 12
        (2, 5, 1, 0.0, (True, False)),  # MQA: 8 > 5
    ],
)
def test_which_biases_move(
    t: int, i: int, k: int | None, dropout: float, want: tuple[bool, bool]
) -> None:
    module = make_module(16, 4, k=k)
    assert module._kv_biases_after(dropout, i, t) == want


def test_biases_stay_where_the_projections_must_run_as_they_are() -> None:
    assert make_module(bias=False)._kv_biases_after(0.0, 12, 2) == (False, False)
    assert make_module(qk_norm=True)._kv_biases_after(0.0, 12, 2) == (False, False)
    hooked = make_module()
    hooked.image_key.register_forward_hook(lambda *args: None)
    assert hooked._kv_biases_after(0.0, 12, 2) == (False, False)
    one_bias = make_module()
    one_bias.image_key.bias = None
    assert one_bias._kv_biases_after(0.0, 12, 2) == (False, False)  # no home for b_k's zero grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert make_module()._kv_biases_after(0.0, 12, 2) == (False, False)


@pytest.mark.parametrize(
    ("t", "i", "want"),
    [(2, 12, [False]), (12, 2, [True])],  # one stacked product: bias-free, or with its bias
)
def test_inference_runs_the_stacked_kv_product_without_its_bias_where_the_bias_moved(
    monkeypatch: pytest.MonkeyPatch, t: int, i: int, want: list[bool]
) -> None:
    module = projected(make_module())
    text, image = torch.randn(2, t, 16), torch.randn(2, i, 16)
    seen = kv_products(monkeypatch, module)
    with torch.no_grad():
        module(text, image, need_weights=False)
        assert module.which_path(text, image, need_weights=False) == "sdpa"
    assert seen == want


def test_training_projects_keys_without_their_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    module = projected(make_module())
    text, image = torch.randn(2, 2, 16), torch.randn(2, 12, 16)
    seen = kv_products(monkeypatch, module)
    module(text, image, need_weights=False)[0].sum().backward()
    assert seen == [False, False]  # two products (gradients), neither with a bias
    module.train()
    module.dropout.p = 0.5
    seen.clear()
    module(text, image, need_weights=False)[0].sum().backward()
    assert seen == [False, True]  # with dropout the value bias stays in its product


# --------------------------------------------------------------------------------------------
# Same answers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize(("t", "i", "k"), [(2, 12, None), (2, 12, 2), (12, 2, None), (3, 7, 1)])
def test_moved_biases_match_reference_float64(
    t: int, i: int, k: int | None, mask_name: str, need_weights: bool
) -> None:
    module = projected(make_module(16, 4, k=k, dtype=torch.float64))
    text = torch.randn(2, t, 16, dtype=torch.float64)
    image = torch.randn(2, i, 16, dtype=torch.float64)
    mask = MASKS[mask_name](2, 4, t, i, torch.Generator().manual_seed(7))
    with torch.no_grad():
        out, weights = module(text, image, mask, need_weights=need_weights)
    ref_out, ref_weights = reference_attention(module, text, image, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("mask_name", ["none", "pad_2d_empty_element", "per_head_4d"])
def test_gradients_match_the_biases_in_their_products(mask_name: str, dropout: float) -> None:
    # float64; with dropout both modules draw the same mask from the same seed
    module = projected(make_module(16, 4, k=2, dropout=dropout, dtype=torch.float64)).train()
    before = keep_biases_in_products(module)
    text = torch.randn(2, 3, 16, dtype=torch.float64)
    image = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = MASKS[mask_name](2, 4, 3, 9, torch.Generator().manual_seed(3))
    cotangent = torch.randn(2, 3, 16, dtype=torch.float64)
    assert module._kv_biases_after(dropout, 9, 3) == (True, dropout == 0)

    def grads(m: CrossModalAttention) -> tuple[Tensor, dict[str, Tensor]]:
        torch.manual_seed(11)
        x, y = text.clone().requires_grad_(True), image.clone().requires_grad_(True)
        out, _ = m(x, y, mask, need_weights=False)
        (out * cotangent).sum().backward()
        assert x.grad is not None
        assert y.grad is not None
        named = {name: p.grad for name, p in m.named_parameters()}
        assert all(g is not None for g in named.values())
        return out, {"text": x.grad, "image": y.grad, **named}  # type: ignore[dict-item]

    out, got = grads(module)
    want_out, want = grads(before)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-11, msg=name)
    # the softmax cancels the key bias: its gradient is exactly zero, and still a tensor (DDP)
    assert torch.equal(got["image_key.bias"], torch.zeros_like(got["image_key.bias"]))


def test_bf16_moved_biases_match_float32() -> None:
    # the same bound the projected path meets in bf16 (test_attention.HALF_TOLERANCES)
    from test_attention import HALF_TOLERANCES

    module = projected(make_module(32, 4))
    text, image = torch.randn(2, 3, 32), torch.randn(2, 40, 32)
    with torch.no_grad():
        want, _ = module(text, image, need_weights=False)
        half = copy.deepcopy(module).bfloat16()
        got, _ = half(text.bfloat16(), image.bfloat16(), need_weights=False)
    assert module._kv_biases_after(0.0, 40, 3) == (True, True)
    torch.testing.assert_close(got.float(), want, **HALF_TOLERANCES[torch.bfloat16])


# --------------------------------------------------------------------------------------------
# attend's value_bias
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("route", ["fused", "explicit", "math"])
def test_attend_value_bias_equals_bias_on_every_value(
    route: str, kv_heads: int, mask_name: str
) -> None:
    b, h, t, i, d = 2, 4, 3, 6, 5
    q = torch.randn(b, h, t, d, dtype=torch.float64)
    k = torch.randn(b, kv_heads, i, d, dtype=torch.float64)
    v = torch.randn(b, kv_heads, i, d, dtype=torch.float64)
    bias = torch.randn(kv_heads * d, dtype=torch.float64)
    keep = MASKS[mask_name](b, h, t, i, torch.Generator().manual_seed(5))
    mask = None if keep is None else _rank4(keep)
    kwargs: dict[str, Any] = {
        "need_weights": route == "explicit",
        "force_math": route == "math",
    }
    got, got_weights = attend(q, k, v, mask, value_bias=bias, **kwargs)
    want, want_weights = attend(q, k, v + bias.view(1, kv_heads, 1, d), mask, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if route == "explicit":
        torch.testing.assert_close(got_weights, want_weights, rtol=0, atol=0)
    if keep is not None:  # a row that sees nothing: zero context, bias and all
        dead = ~mask.expand(b, h, t, i).any(-1)  # type: ignore[union-attr]
        assert (got[dead] == 0).all()


def _rank4(keep: Tensor) -> Tensor:
    """A test mask as the ``(b|1, h|1, t|1, i)`` bool ``attend`` reads."""
    if keep.dim() == 2:
        return keep[:, None, None, :]
    if keep.dim() == 3:
        return keep[:, None]
    return keep


def test_attend_value_bias_errors() -> None:
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"value_bias needs dropout_p == 0.*got dropout_p=0.1"):
        attend(q, k, k, dropout_p=0.1, value_bias=torch.zeros(8))
    with pytest.raises(ValueError, match=r"value_bias must have shape \(k·d,\) = \(8,\).*\(4,\)"):
        attend(q, k, k, value_bias=torch.zeros(4))


# --------------------------------------------------------------------------------------------
# The absorbed path under dropout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "projected"])
def test_dropout_scales_the_value_bias_by_each_rows_kept_mass(absorb: bool) -> None:
    # Every value is the value bias (W_v = 0): a row's context is b_v times the sum of its
    # probabilities after dropout, not b_v whole -- on the absorbed path as on the projected one.
    module = CrossModalAttention(16, 4, dropout=0.5, absorb_projections=absorb).train()
    with torch.no_grad():
        module.image_value.weight.zero_()
        module.output_proj.weight.copy_(torch.eye(16))
        module.output_proj.bias.zero_()
    text, image = torch.randn(8, 1, 16), torch.randn(8, 6, 16)
    path = module.which_path(text, image, need_weights=False)
    assert path == ("absorbed" if absorb else "sdpa")
    out, _ = module(text, image, need_weights=False)  # (8, 1, 16): h = 4 heads of d = 4
    ratio = (out / module.image_value.bias).view(8, 4, 4)  # (b, h, d): kept mass of each row
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))  # one factor per row
    assert (ratio - 1).abs().amax() > 0.1  # 6 probabilities at p = 0.5: the mass varies
    assert ratio.min() >= 0
