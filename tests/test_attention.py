"""Tests of ``xmodal.attention``: CrossModalAttention, ImageKV and the attention core.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` query heads, ``k`` key/value
heads, ``d`` head width, ``D`` text width, ``E`` image width.

The yardstick is ``tests/reference/naive.py``: attention written from the equations in float64,
one head and one query at a time. Everything here is small (widths <= 64) and fast.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.naive import keep_mask, reference_attention
from torch import Tensor

import xmodal.attention
from xmodal import CrossModalAttention, ImageKV, attend
from xmodal.attention import _fold_groups
from xmodal.bench.notebook import NotebookCrossModalAttention as NotebookAttention

# --------------------------------------------------------------------------------------------
# Shapes, masks and helpers
# --------------------------------------------------------------------------------------------

# (b, t, i, D, E, h, d, k, qk_norm, bias); d=None means D // h, k=None means h.
CONFIGS = [
    pytest.param((2, 3, 5, 16, 16, 4, None, None, False, True), id="notebook-like"),
    pytest.param((2, 3, 5, 16, 24, 4, None, 2, False, True), id="E!=D-gqa"),
    pytest.param((1, 1, 7, 16, 8, 4, 6, 1, True, False), id="d!=D/h-mqa-qknorm-nobias-t1"),
    pytest.param((3, 4, 1, 12, 20, 2, 8, 2, True, True), id="i1-qknorm"),
    pytest.param((2, 2, 6, 32, 16, 8, 4, 4, False, False), id="h8-gqa-nobias"),
    pytest.param((2, 5, 3, 16, 16, 4, 8, 1, True, True), id="mqa-qknorm-d8"),
]

MaskFn = Callable[[int, int, int, int, torch.Generator], Tensor | None]


def _bern(gen: torch.Generator, *shape: int, p: float = 0.6) -> Tensor:
    return torch.rand(*shape, generator=gen) < p


def _pad_2d_empty_element(b: int, h: int, t: int, i: int, gen: torch.Generator) -> Tensor:
    mask = _bern(gen, b, i)
    mask[-1] = False  # the last batch element sees no image at all
    return mask


def _per_query_3d(b: int, h: int, t: int, i: int, gen: torch.Generator) -> Tensor:
    mask = _bern(gen, b, t, i)
    mask[0, 0] = False  # a text token that may see no image token
    return mask


def _per_head_4d(b: int, h: int, t: int, i: int, gen: torch.Generator) -> Tensor:
    mask = _bern(gen, b, h, t, i)
    mask[0, -1, 0] = False  # one head of one query sees nothing; the other heads do
    return mask


def _float_3d(b: int, h: int, t: int, i: int, gen: torch.Generator) -> Tensor:
    values = torch.tensor([0.0, 1.0, 0.5, -2.0])  # non-zero = keep, as in the notebook
    mask = values[torch.randint(0, 4, (b, t, i), generator=gen)]
    mask[0, -1] = 0.0
    return mask


def _int_2d(b: int, h: int, t: int, i: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (b, i), generator=gen) * 3  # int64 in {0, 3}


MASKS: dict[str, MaskFn] = {
    "none": lambda b, h, t, i, gen: None,
    "pad_2d": lambda b, h, t, i, gen: _bern(gen, b, i),
    "pad_2d_empty_element": _pad_2d_empty_element,
    "per_query_3d": _per_query_3d,
    "per_head_4d": _per_head_4d,
    "bcast_2d_b1": lambda b, h, t, i, gen: _bern(gen, 1, i),
    "bcast_3d_b1": lambda b, h, t, i, gen: _bern(gen, 1, t, i),
    "bcast_3d_t1": lambda b, h, t, i, gen: _bern(gen, b, 1, i),
    "bcast_4d_b1": lambda b, h, t, i, gen: _bern(gen, 1, h, t, i),
    "bcast_4d_h1": lambda b, h, t, i, gen: _bern(gen, b, 1, t, i),
    "bcast_4d_t1": lambda b, h, t, i, gen: _bern(gen, b, h, 1, i),
    "bcast_4d_all1": lambda b, h, t, i, gen: _bern(gen, 1, 1, 1, i),
    "float_3d": _float_3d,
    "int_2d": _int_2d,
    "all_masked": lambda b, h, t, i, gen: torch.zeros(b, t, i, dtype=torch.bool),
}
MASK_NAMES = list(MASKS)


def make_module(
    D: int = 16,
    h: int = 4,
    *,
    E: int | None = None,
    d: int | None = None,
    k: int | None = None,
    qk_norm: bool = False,
    bias: bool = True,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> CrossModalAttention:
    """A module in eval mode; qk-norm weights randomised so that they matter."""
    module = CrossModalAttention(
        D, h, image_dim=E, head_dim=d, num_kv_heads=k, qk_norm=qk_norm, dropout=dropout, bias=bias
    )
    if qk_norm:
        with torch.no_grad():
            assert module.q_norm is not None
            assert module.k_norm is not None
            module.q_norm.weight.uniform_(0.5, 1.5)
            module.k_norm.weight.uniform_(0.5, 1.5)
    return module.to(dtype).eval()


def make_case(
    config: tuple, mask_name: str, dtype: torch.dtype = torch.float32
) -> tuple[CrossModalAttention, Tensor, Tensor, Tensor | None]:
    b, t, i, D, E, h, d, k, qk_norm, bias = config
    module = make_module(D, h, E=E, d=d, k=k, qk_norm=qk_norm, bias=bias, dtype=dtype)
    text = torch.randn(b, t, D, dtype=dtype)
    image = torch.randn(b, i, E, dtype=dtype)
    gen = torch.Generator().manual_seed(1234)
    mask = MASKS[mask_name](b, h, t, i, gen)
    return module, text, image, mask


def dead_rows(mask: Tensor | None, b: int, h: int, t: int, i: int) -> Tensor:
    """``(b, h, t)``: True where a query head may see no image token."""
    return ~keep_mask(mask, b, h, t, i).any(-1)


# --------------------------------------------------------------------------------------------
# Parity with the naive float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference_float64(config: tuple, mask_name: str, need_weights: bool) -> None:
    # float64 all the way: any difference beyond summation order (~1e-16 relative) is a bug.
    module, text, image, mask = make_case(config, mask_name, torch.float64)
    out, weights = module(text, image, mask, need_weights=need_weights)
    ref_out, ref_weights = reference_attention(module, text, image, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    if need_weights:
        assert weights is not None
        torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12)
    else:
        assert weights is None


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference_float32(config: tuple, mask_name: str, need_weights: bool) -> None:
    # float32 has a 24-bit significand (eps 2^-23 ~ 1.2e-7). Projections of width <= 32, a dot
    # product, a softmax and a weighted sum of O(1) values accumulate a few hundred eps at
    # most: 2e-5 absolute / 1e-4 relative leaves a wide margin and still catches a wrong head,
    # a wrong mask entry or a wrong scale (errors of 1e-2 and more).
    module, text, image, mask = make_case(config, mask_name)
    out, weights = module(text, image, mask, need_weights=need_weights)
    ref_out, ref_weights = reference_attention(module, text, image, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=2e-5)
    if need_weights:
        assert weights is not None
        assert weights.dtype == torch.float32
        torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_matches_explicit(config: tuple, mask_name: str) -> None:
    # The one switch between the two paths: same inputs, float32, same tolerance as above.
    module, text, image, mask = make_case(config, mask_name)
    fused, none = module(text, image, mask, need_weights=False)
    explicit, weights = module(text, image, mask, need_weights=True)
    assert none is None
    assert weights is not None
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize(
    "mask_name", ["none", "per_query_3d", "per_head_4d", "pad_2d_empty_element"]
)
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
def test_gradients_match_reference_float64(need_weights: bool, mask_name: str) -> None:
    module, text, image, mask = make_case(CONFIGS[1].values[0], mask_name, torch.float64)
    text.requires_grad_(True)
    image.requires_grad_(True)
    cotangent = torch.randn(text.shape, dtype=torch.float64)
    out, _ = module(text, image, mask, need_weights=need_weights)
    grads = torch.autograd.grad((out * cotangent).sum(), (text, image))
    ref_out, _ = reference_attention(module, text, image, mask)
    ref_grads = torch.autograd.grad((ref_out * cotangent).sum(), (text, image))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
def test_empty_image_gives_zero_context(need_weights: bool) -> None:
    # i == 0 is served: every query sees nothing, so the output is output_proj's bias.
    module = make_module(16, 4, E=8, k=2)
    text, image = torch.randn(2, 3, 16), torch.randn(2, 0, 8)
    for mask in (None, torch.ones(2, 0, dtype=torch.bool)):
        out, weights = module(text, image, mask, need_weights=need_weights)
        torch.testing.assert_close(out, module.output_proj.bias.expand(2, 3, 16))
        if need_weights:
            assert weights is not None
            assert weights.shape == (2, 4, 3, 0)


@pytest.mark.parametrize(("b", "t"), [(2, 0), (0, 3)], ids=["no-text", "no-batch"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
def test_empty_text_or_batch(need_weights: bool, b: int, t: int) -> None:
    module = make_module(k=2)
    text, image = torch.randn(b, t, 16), torch.randn(b, 5, 16)
    mask = torch.ones(b, t, 5, dtype=torch.bool)
    out, weights = module(text, image, mask, need_weights=need_weights)
    assert out.shape == (b, t, 16)
    if need_weights:
        assert weights is not None
        assert weights.shape == (b, 4, t, 5)


def test_gqa_maps_query_head_to_kv_head_by_index() -> None:
    # k=2, h=4: query heads 0, 1 read key/value head 0, heads 2, 3 read head 1 (a // g). Make
    # the two key/value heads carry constant, distinguishable values and look at the context.
    module = make_module(8, 4, d=2, k=2, bias=False)
    with torch.no_grad():
        module.image_key.weight.zero_()  # uniform attention
        module.image_value.weight.zero_()
        module.image_value.weight[:, 0] = torch.tensor([1.0, 1.0, 2.0, 2.0])  # v = x0 * that
        module.output_proj.weight.copy_(torch.eye(8))
    image = torch.zeros(1, 3, 8)
    image[..., 0] = 1.0
    out, _ = module(torch.randn(1, 2, 8), image, need_weights=False)
    expected = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # heads (0, 1) | (2, 3)
    torch.testing.assert_close(out[0, 0], expected)


# --------------------------------------------------------------------------------------------
# Half precision and rows with no visible image
# --------------------------------------------------------------------------------------------

# Tolerances against a float32 run of the *same* half-rounded weights and inputs, so that only
# the half-precision arithmetic is measured. bfloat16 keeps 8 significant bits (unit roundoff
# u = 2^-8 ~ 3.9e-3): each projection, the scores and the weighted sum round once or more, a
# few 1e-3 relative per op. float16 keeps 11 bits (u = 2^-11 ~ 4.9e-4), eight times finer. The
# weights come from a float32 softmax and are rounded once, from scores that carry the error
# of the projections. We allow 4u absolute + 4u relative; measured worst cases over 20 seeds
# and these masks are about 1u (fp16 4.4e-4, bf16 2.8e-3), while a wrong mask entry or head
# moves outputs by 1e-1 and more.
HALF_TOLERANCES = {
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


@pytest.mark.parametrize(
    "mask_name", ["none", "pad_2d_empty_element", "per_query_3d", "per_head_4d", "float_3d"]
)
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_float32(
    dtype: torch.dtype, need_weights: bool, mask_name: str
) -> None:
    module, text, image, mask = make_case(CONFIGS[1].values[0], mask_name, dtype)
    module32 = copy.deepcopy(module).float()
    out, weights = module(text, image, mask, need_weights=need_weights)
    out32, weights32 = module32(text.float(), image.float(), mask, need_weights=need_weights)
    assert out.dtype == dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), out32, **HALF_TOLERANCES[dtype])
    if need_weights:
        assert weights is not None
        assert weights32 is not None
        assert weights.dtype == dtype
        torch.testing.assert_close(weights.float(), weights32, **HALF_TOLERANCES[dtype])


@pytest.mark.parametrize("mask_name", ["pad_2d_empty_element", "per_query_3d", "all_masked"])
@pytest.mark.parametrize(
    ("need_weights", "math_budget"),
    [(False, None), (False, 0), (True, None)],
    ids=["fused", "fused-sdpa-only", "explicit"],
)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_fully_masked_rows_no_nan_forward_backward(
    dtype: torch.dtype,
    need_weights: bool,
    math_budget: int | None,
    mask_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if math_budget is not None:  # half-precision CPU training on SDPA, not the math path
        monkeypatch.setattr(xmodal.attention, "MATH_TRAINING_MAX_SCORES", math_budget)
    config = (2, 3, 5, 16, 16, 4, None, 2, True, True)
    module, text, image, mask = make_case(config, mask_name, dtype)
    text.requires_grad_(True)
    image.requires_grad_(True)
    out, weights = module(text, image, mask, need_weights=need_weights)
    out.float().square().sum().backward()

    dead = dead_rows(mask, 2, 4, 3, 5)  # (b, h, t)
    dead_queries = dead.all(dim=1)  # (b, t): every head of this text token sees nothing
    assert dead_queries.any()
    assert torch.isfinite(out).all()
    # A query that sees nothing gets a zero context: its output is output_proj's bias exactly.
    assert module.output_proj.bias is not None
    torch.testing.assert_close(
        out[dead_queries], module.output_proj.bias.expand_as(out[dead_queries])
    )
    if weights is not None:
        assert (weights[dead] == 0).all()
    assert text.grad is not None
    assert image.grad is not None
    assert torch.isfinite(text.grad).all()
    assert torch.isfinite(image.grad).all()
    assert (text.grad[dead_queries] == 0).all()  # no gradient flows into those queries
    for name, param in module.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_bf16_softmax_on_cpu_is_the_float32_softmax_rounded_once() -> None:
    # attend's explicit path feeds bf16 scores to the softmax without upcasting them: the CPU
    # kernel computes in float32 and rounds once. Check that claim on this torch, bit for bit,
    # with masked (finfo.min) entries and fully masked rows as attend produces them.
    gen = torch.Generator().manual_seed(0)
    scores = (torch.randn(3, 4, 33, 70, generator=gen) * 8).bfloat16()
    keep = torch.rand(3, 1, 33, 70, generator=gen) > 0.3
    keep[0, :, 5] = False
    lowest = torch.finfo(torch.bfloat16).min
    masked = scores.masked_fill(~keep, lowest)
    upcast = torch.softmax(masked.float().masked_fill(~keep, torch.finfo(torch.float32).min), -1)
    assert torch.equal(torch.softmax(masked, dim=-1), upcast.bfloat16())


def test_bf16_cpu_training_takes_the_math_path_and_matches_sdpa(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dtype = torch.bfloat16
    module, text, image, mask = make_case(CONFIGS[1].values[0], "per_query_3d", dtype)
    calls: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(xmodal.attention.F, "scaled_dot_product_attention", counting_sdpa)

    def run(budget: int) -> tuple[Tensor, list[Tensor]]:
        monkeypatch.setattr(xmodal.attention, "MATH_TRAINING_MAX_SCORES", budget)
        x, y = text.clone().requires_grad_(True), image.clone().requires_grad_(True)
        module.zero_grad()
        out, weights = module(x, y, mask, need_weights=False)
        assert weights is None
        out.float().square().sum().backward()
        assert x.grad is not None
        assert y.grad is not None
        return out, [x.grad, y.grad, *(p.grad for p in module.parameters())]

    math_out, math_grads = run(1 << 24)
    assert calls == []  # training in half precision on CPU: the math path
    sdpa_out, sdpa_grads = run(0)
    assert calls == [1]  # over the budget: SDPA
    torch.testing.assert_close(math_out, sdpa_out, **HALF_TOLERANCES[dtype])
    for a, b in zip(math_grads, sdpa_grads, strict=True):
        assert a is not None
        assert b is not None
        scale = b.float().abs().max().clamp_min(1.0)  # gradients sum many rounded terms
        torch.testing.assert_close(a.float() / scale, b.float() / scale, **HALF_TOLERANCES[dtype])
    monkeypatch.setattr(xmodal.attention, "MATH_TRAINING_MAX_SCORES", 1 << 24)
    with torch.no_grad():  # inference keeps SDPA, whose memory grows with t + i
        module(text, image, mask, need_weights=False)
    assert calls == [1, 1]
    module16, text16, image16, _ = make_case(CONFIGS[1].values[0], "none", torch.float16)
    module16(text16.requires_grad_(True), image16, need_weights=False)  # fp16: not measured
    assert calls == [1, 1, 1]


# --------------------------------------------------------------------------------------------
# Weights and dropout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", ["none", "per_head_4d", "pad_2d_empty_element", "float_3d"])
def test_weights_sum_to_one_over_visible_tokens(mask_name: str) -> None:
    config = (2, 3, 5, 16, 16, 4, None, 2, False, True)
    module, text, image, mask = make_case(config, mask_name)
    _, weights = module(text, image, mask)
    assert weights is not None
    assert weights.shape == (2, 4, 3, 5)
    keep = keep_mask(mask, 2, 4, 3, 5)
    assert (weights[~keep] == 0).all()  # nothing on a masked token
    assert (weights >= 0).all()
    sums = weights.sum(-1)
    live = keep.any(-1)
    torch.testing.assert_close(sums[live], torch.ones_like(sums[live]))  # fp32: ~1e-7
    assert (sums[~live] == 0).all()  # rows that see nothing: all-zero weights


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
def test_eval_is_deterministic(need_weights: bool) -> None:
    module = make_module(dropout=0.5)
    text, image = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    first, _ = module(text, image, need_weights=need_weights)
    second, _ = module(text, image, need_weights=need_weights)
    assert torch.equal(first, second)


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
def test_dropout_acts_only_in_training(need_weights: bool) -> None:
    module = make_module(dropout=0.5)
    text, image = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = _per_query_3d(2, 4, 3, 5, torch.Generator().manual_seed(0))
    eval_out, eval_weights = module(text, image, mask, need_weights=need_weights)
    module.train()
    train_out, train_weights = module(text, image, mask, need_weights=need_weights)
    assert not torch.allclose(train_out, eval_out)  # p=0.5 on 2·4·3·5 probabilities
    if need_weights:
        # The returned weights are the softmax probabilities *before* dropout.
        assert train_weights is not None
        assert eval_weights is not None
        torch.testing.assert_close(train_weights, eval_weights, rtol=0, atol=0)
    # Dropout never gives a masked-out query a context: its output stays the bias.
    dead_queries = dead_rows(mask, 2, 4, 3, 5).all(1)
    assert module.output_proj.bias is not None
    torch.testing.assert_close(train_out[dead_queries], module.output_proj.bias.expand(1, 16))


def test_training_without_dropout_equals_eval() -> None:
    module = make_module(dropout=0.0)
    text, image = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    eval_out, _ = module(text, image)
    module.train()
    train_out, _ = module(text, image)
    assert torch.equal(train_out, eval_out)


# --------------------------------------------------------------------------------------------
# gradcheck and hypothesis
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config", [(8, 2, None, None, False), (8, 4, 12, 2, True)], ids=["mha", "gqa-qknorm-E12"]
)
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
def test_gradcheck_float64(need_weights: bool, config: tuple) -> None:
    D, h, E, k, qk_norm = config
    module = make_module(D, h, E=E, k=k, qk_norm=qk_norm, dtype=torch.float64)
    text = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)
    image = torch.randn(2, 4, E or D, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]]] * 2, dtype=torch.bool)

    def run(x: Tensor, y: Tensor) -> Tensor:
        return module(x, y, mask, need_weights=need_weights)[0]

    assert torch.autograd.gradcheck(run, (text, image))


@st.composite
def attention_cases(draw: st.DrawFn) -> tuple:
    k = draw(st.sampled_from([1, 2]))
    h = k * draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([2, 4, 8]))
    D = draw(st.integers(2, 24))
    E = draw(st.integers(2, 24))
    b, t, i = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    rank = draw(st.sampled_from([0, 2, 3, 4]))
    full = {2: (b, i), 3: (b, t, i), 4: (b, h, t, i)}.get(rank)
    mask = None
    if full is not None:
        shape = [draw(st.sampled_from([1, n])) for n in full[:-1]] + [i]
        bits = draw(st.lists(st.booleans(), min_size=_numel(shape), max_size=_numel(shape)))
        mask = torch.tensor(bits, dtype=torch.bool).reshape(shape)
        if draw(st.booleans()):
            mask = mask.to(torch.float64) * 2.5  # numeric keep-mask
    flags = draw(st.booleans()), draw(st.booleans())
    return (b, t, i, D, E, h, d, k, *flags), mask


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@settings(max_examples=15, deadline=None)
@given(case=attention_cases(), need_weights=st.booleans())
def test_hypothesis_matches_reference(case: tuple, need_weights: bool) -> None:
    (b, t, i, D, E, h, d, k, qk_norm, bias), mask = case
    module = make_module(D, h, E=E, d=d, k=k, qk_norm=qk_norm, bias=bias, dtype=torch.float64)
    text = torch.randn(b, t, D, dtype=torch.float64)
    image = torch.randn(b, i, E, dtype=torch.float64)
    out, weights = module(text, image, mask, need_weights=need_weights)
    ref_out, ref_weights = reference_attention(module, text, image, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The notebook's module, torch.compile
# --------------------------------------------------------------------------------------------


def test_notebook_state_dict_loads_and_matches() -> None:
    notebook = NotebookAttention().eval()  # 256 wide, 8 heads: the notebook's defaults
    saved = io.BytesIO()
    torch.save(notebook.state_dict(), saved)  # as a notebook user would have saved it
    saved.seek(0)
    module = CrossModalAttention()
    module.load_state_dict(torch.load(saved, weights_only=True))  # strict: same keys and shapes
    module.eval()
    text, image = torch.randn(2, 5, 256), torch.randn(2, 7, 256)
    want_out, want_weights = notebook(text, image)
    out, weights = module(text, image)
    # float32, same operations in a different order (xmodal scales q before the product).
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights, want_weights, rtol=1e-4, atol=1e-5)
    fused, _ = module(text, image, need_weights=False)
    torch.testing.assert_close(fused, want_out, rtol=1e-4, atol=1e-5)


def test_notebook_parity_with_a_mask_it_understands() -> None:
    # The notebook takes a mask that broadcasts against (b, h, t, i) scores and gives rows with
    # at least one visible token the same answer as xmodal.
    notebook = NotebookAttention(32, 4).eval()
    module = CrossModalAttention(32, 4)
    module.load_state_dict(notebook.state_dict())
    module.eval()
    text, image = torch.randn(2, 3, 32), torch.randn(2, 6, 32)
    mask = torch.rand(2, 1, 3, 6) < 0.5
    mask[..., 0] = True
    torch.testing.assert_close(module(text, image, mask)[0], notebook(text, image, mask)[0])


def test_notebook_defaults_and_positional_call() -> None:
    module = CrossModalAttention()
    assert (module.embed_dim, module.num_heads, module.head_dim) == (256, 8, 32)
    assert module.dropout.p == pytest.approx(0.1)
    assert module.training  # like any nn.Module, and like the notebook
    notebook = NotebookAttention()
    assert module.state_dict().keys() == notebook.state_dict().keys()


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
def test_compile_fullgraph_matches_eager(need_weights: bool) -> None:
    torch._dynamo.reset()
    module = make_module(16, 4, E=8, k=2, qk_norm=True)
    text, image = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    mask = _per_query_3d(2, 4, 3, 5, torch.Generator().manual_seed(0))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got, got_w = compiled(text, image, mask, need_weights=need_weights)
    want, want_w = module(text, image, mask, need_weights=need_weights)
    torch.testing.assert_close(got, want)
    if need_weights:
        torch.testing.assert_close(got_w, want_w)


@pytest.mark.slow
def test_compile_inductor_matches_eager() -> None:
    torch._dynamo.reset()
    module = make_module(16, 4, E=8, k=2)
    text, image = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    mask = _pad_2d_empty_element(2, 4, 3, 5, torch.Generator().manual_seed(0))
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(
        compiled(text, image, mask, need_weights=False)[0],
        module(text, image, mask, need_weights=False)[0],
        rtol=1e-5,
        atol=1e-6,
    )


# --------------------------------------------------------------------------------------------
# ImageKV
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
def test_encode_image_then_image_kv_equals_image_features(need_weights: bool) -> None:
    module = make_module(16, 4, E=12, k=2, qk_norm=True)
    text, image = torch.randn(2, 3, 16), torch.randn(2, 5, 12)
    mask = _per_head_4d(2, 4, 3, 5, torch.Generator().manual_seed(0))
    kv = module.encode_image(image)
    assert isinstance(kv, ImageKV)
    assert kv.key.shape == kv.value.shape == (2, 2, 5, 4)  # (b, k, i, d): k heads, not h
    assert (kv.batch_size, kv.num_kv_heads, kv.image_len, kv.head_dim) == (2, 2, 5, 4)
    want, want_w = module(text, image, mask, need_weights=need_weights)
    got, got_w = module(text, None, mask, need_weights=need_weights, image_kv=kv)
    assert torch.equal(got, want)
    if need_weights:
        assert torch.equal(got_w, want_w)


def test_image_kv_extend_equals_encoding_the_concatenation() -> None:
    module = make_module(16, 4, E=12, k=2, qk_norm=True)
    first, second = torch.randn(2, 5, 12), torch.randn(2, 3, 12)
    extended = module.encode_image(first).extend(module.encode_image(second))
    whole = module.encode_image(torch.cat([first, second], dim=1))
    assert extended.key.shape == (2, 2, 8, 4)
    torch.testing.assert_close(extended.key, whole.key)  # fp32, row-wise identical products
    torch.testing.assert_close(extended.value, whole.value)
    text = torch.randn(2, 3, 16)
    mask = _per_query_3d(2, 4, 3, 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        module(text, image_kv=extended, attention_mask=mask, need_weights=False)[0],
        module(text, torch.cat([first, second], dim=1), mask, need_weights=False)[0],
    )


# --------------------------------------------------------------------------------------------
# Error messages
# --------------------------------------------------------------------------------------------


def _module() -> CrossModalAttention:
    return make_module(16, 4, E=8, k=2)


def _call(*args: object, **kwargs: object) -> Callable[[], object]:
    return lambda: _module()(*args, **kwargs)


_GEN = torch.Generator().manual_seed(0)
T, I = torch.randn(2, 3, 16, generator=_GEN), torch.randn(2, 5, 8, generator=_GEN)  # noqa: E741
KV = _module().encode_image(I)
KV_PARTS = torch.randn(2, 4, 5, 4), torch.randn(2, 2, 5, 8)  # wrong heads, wrong head width

CONSTRUCTOR_ERRORS = [
    ((10, 4), {}, ValueError, r"embed_dim \(10\) must be divisible by num_heads \(4\)"),
    ((16, 4), {"num_kv_heads": 3}, ValueError, r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    ((16, 4), {"num_kv_heads": 0}, ValueError, r"num_kv_heads must be positive, got 0"),
    ((16, 0), {}, ValueError, r"num_heads must be positive, got 0"),
    ((-4, 2), {}, ValueError, r"embed_dim must be positive, got -4"),
    ((16.0, 4), {}, TypeError, r"embed_dim must be an int, got float 16.0"),
    ((16, True), {}, TypeError, r"num_heads must be an int, got bool True"),
    ((16, 4), {"image_dim": 0}, ValueError, r"image_dim must be positive"),
    ((16, 4), {"head_dim": 0}, ValueError, r"head_dim must be positive"),
    ((16, 4), {"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    ((16, 4), {"dropout": "0.1"}, TypeError, r"dropout must be a float in \[0, 1\), got '0.1'"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "kwargs", "error", "message"), CONSTRUCTOR_ERRORS)
def test_constructor_errors(
    args: tuple, kwargs: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        CrossModalAttention(*args, **kwargs)


def test_indivisible_width_is_fine_with_head_dim() -> None:
    module = CrossModalAttention(10, 4, head_dim=3)
    out, weights = module(torch.randn(1, 2, 10), torch.randn(1, 3, 10))
    assert out.shape == (1, 2, 10)
    assert weights is not None
    assert weights.shape == (1, 4, 2, 3)


FORWARD_ERRORS = [
    ("text rank 2", _call(torch.randn(3, 16), I), ValueError,
     r"text_features must have shape \(b, n, 16\), got rank 2 shape \(3, 16\)"),
    ("image rank 4", _call(T, torch.randn(2, 1, 5, 8)), ValueError,
     r"image_features must have shape \(b, n, 8\), got rank 4 shape \(2, 1, 5, 8\)"),
    ("text width", _call(torch.randn(2, 3, 8), I), ValueError,
     r"text_features must have shape \(b, n, 16\), got last dimension 8 \(shape \(2, 3, 8\)\)"),
    ("image width", _call(T, torch.randn(2, 5, 16)), ValueError,
     r"image_features must have shape \(b, n, 8\), got last dimension 16"),
    ("batch sizes", _call(T, torch.randn(3, 5, 8)), ValueError,
     r"text_features and image_features must have the same batch size, got shapes "
     r"\(2, 3, 16\) and \(3, 5, 8\)"),
    ("text not a tensor", _call([[1.0]], I), TypeError,
     r"text_features must be a torch.Tensor, got list"),
    ("image not a tensor", _call(T, 3.0), TypeError,
     r"image_features must be a torch.Tensor, got float"),
    ("text dtype", _call(T.double(), I), TypeError,
     r"text_features has dtype torch.float64, but the module's weights are torch.float32"),
    ("image dtype", _call(T, I.half()), TypeError,
     r"image_features has dtype torch.float16, but the module's weights are torch.float32"),
    ("text device", _call(T.to("meta"), I), ValueError,
     r"text_features is on meta, but the module's weights are on cpu"),
    ("neither", _call(T), ValueError, r"pass either image_features or image_kv, got neither"),
    ("both", _call(T, I, image_kv=KV), ValueError,
     r"pass either image_features or image_kv, not both"),
    ("image_kv type", _call(T, image_kv=(KV.key, KV.value)), TypeError,
     r"image_kv must be an ImageKV, got tuple"),
    ("image_kv batch", _call(torch.randn(3, 3, 16), image_kv=KV), ValueError,
     r"image_kv.key has shape \(2, 2, 5, 4\), expected \(b, k, i, d\) = \(3, 2, 5, 4\)"),
    ("image_kv heads", _call(T, image_kv=ImageKV(KV_PARTS[0], KV_PARTS[0])), ValueError,
     r"image_kv.key has shape \(2, 4, 5, 4\), expected \(b, k, i, d\) = \(2, 2, 5, 4\)"),
    ("image_kv head width", _call(T, image_kv=ImageKV(KV_PARTS[1], KV_PARTS[1])),
     ValueError, r"image_kv.key has shape \(2, 2, 5, 8\), expected"),
    ("image_kv dtype", _call(T, image_kv=ImageKV(KV.key.double(), KV.value.double())), TypeError,
     r"image_kv has dtype torch.float64, but text_features has dtype torch.float32"),
    ("image_kv device", _call(T, image_kv=ImageKV(KV.key.to("meta"), KV.value.to("meta"))),
     ValueError, r"image_kv is on meta, but text_features is on cpu"),
    ("mask rank 1", _call(T, I, torch.ones(5, dtype=torch.bool)), ValueError,
     r"attention_mask must have rank 2 \(b, i\), 3 \(b, t, i\) or 4 \(b, h, t, i\); got rank 1 "
     r"with shape \(5\) for scores of shape \(b, h, t, i\) = \(2, 4, 3, 5\)"),
    ("mask rank 5", _call(T, I, torch.ones(2, 1, 4, 3, 5, dtype=torch.bool)), ValueError,
     r"got rank 5 with shape \(2, 1, 4, 3, 5\)"),
    ("mask image len", _call(T, I, torch.ones(2, 6, dtype=torch.bool)), ValueError,
     r"attention_mask has shape \(2, 6\), expected \(b\|1, i\) with b=2, h=4, t=3, i=5"),
    ("mask batch", _call(T, I, torch.ones(3, 3, 5, dtype=torch.bool)), ValueError,
     r"attention_mask has shape \(3, 3, 5\), expected \(b\|1, t\|1, i\)"),
    ("mask heads", _call(T, I, torch.ones(2, 2, 3, 5, dtype=torch.bool)), ValueError,
     r"attention_mask has shape \(2, 2, 3, 5\), expected \(b\|1, h\|1, t\|1, i\) with b=2, h=4"),
    ("mask complex", _call(T, I, torch.ones(2, 5, dtype=torch.complex64)), TypeError,
     r"attention_mask must be boolean or real-valued, got dtype torch.complex64"),
    ("mask not a tensor", _call(T, I, [[1, 0, 1, 1, 1]] * 2), TypeError,
     r"attention_mask must be a torch.Tensor or None, got list"),
    ("mask device", _call(T, I, torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError,
     r"attention_mask is on meta, but the features are on cpu"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in FORWARD_ERRORS],
)
def test_forward_errors(call: Callable[[], object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


IMAGE_KV_ERRORS = [
    ("rank 3", lambda: ImageKV(torch.randn(2, 5, 4), torch.randn(2, 5, 4)), ValueError,
     r"ImageKV.key and ImageKV.value must both have shape \(b, k, i, d\), got \(2, 5, 4\) and "
     r"\(2, 5, 4\)"),
    ("shapes differ", lambda: ImageKV(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 6, 4)), ValueError,
     r"got \(2, 2, 5, 4\) and \(2, 2, 6, 4\)"),
    ("not tensors", lambda: ImageKV([1.0], torch.randn(1, 1, 1, 1)), TypeError,
     r"ImageKV.key and ImageKV.value must be tensors, got list and Tensor"),
    ("extend type", lambda: KV.extend((KV.key, KV.value)), TypeError,
     r"other must be an ImageKV, got tuple"),
    ("extend batch", lambda: KV.extend(ImageKV(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))),
     ValueError, r"cannot extend an ImageKV of shape \(2, 2, 5, 4\) with one of shape "
     r"\(3, 2, 1, 4\): batch, heads and head width must match"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in IMAGE_KV_ERRORS],
)
def test_image_kv_errors(call: Callable[[], object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------------------------
# The attention core on its own
# --------------------------------------------------------------------------------------------


def test_attend_fold_groups_does_not_copy_per_head_for_head_broadcast_masks() -> None:
    # A per-query mask shared by all heads, (b, 1, t, i), folds to (b, 1, g·t, i): g copies of
    # each row, not h.
    q = torch.randn(2, 4, 3, 8)
    mask = torch.rand(2, 1, 3, 5) < 0.5
    folded_q, folded = _fold_groups(q, mask, num_kv_heads=2)
    assert folded_q.shape == (2, 2, 6, 8)
    assert folded is not None
    assert folded.shape == (2, 1, 6, 5)
    assert torch.equal(folded.expand(2, 2, 6, 5), mask.expand(2, 4, 3, 5).reshape(2, 2, 6, 5))


def test_attend_returns_weights_in_query_dtype() -> None:
    q, k, v = (
        torch.randn(1, 2, 3, 4).half(),
        torch.randn(1, 1, 5, 4).half(),
        torch.randn(1, 1, 5, 4).half(),
    )
    context, weights = attend(q, k, v, need_weights=True)
    assert context.dtype == weights.dtype == torch.float16
    assert context.shape == (1, 2, 3, 4)
    assert weights.shape == (1, 2, 3, 5)


def test_fp16_explicit_path_survives_scores_beyond_fp16_range() -> None:
    # q·k/√d ≈ 80,000 > 65,504 (fp16's largest): a product taken in fp16 overflows to inf and the
    # softmax gives NaN. Both paths must give the float32 answer: attend equally to equal keys.
    q = torch.full((1, 1, 2, 64), 100.0, dtype=torch.float16)
    k = torch.full((1, 1, 3, 64), 100.0, dtype=torch.float16)
    v = torch.arange(3 * 64, dtype=torch.float16).view(1, 1, 3, 64) / 64
    want = v.float().mean(dim=2, keepdim=True).expand(1, 1, 2, 64)
    for need_weights in (False, True):
        context, weights = attend(q, k, v, need_weights=need_weights)
        assert torch.isfinite(context).all(), need_weights
        torch.testing.assert_close(context.float(), want, rtol=2e-3, atol=2e-3)
    assert weights is not None
    torch.testing.assert_close(
        weights.float(), torch.full((1, 1, 2, 3), 1 / 3), rtol=2e-3, atol=1e-3
    )


# --------------------------------------------------------------------------------------------
# The empty-row guard is skipped, eagerly on CPU, when no row is empty
# --------------------------------------------------------------------------------------------


def test_no_empty_rows_answers_only_where_it_can_look() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from xmodal.attention import _any_last, _no_empty_rows

    full = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    holed = full.clone()
    holed[1, 0, 2] = False
    assert _no_empty_rows(_any_last(full))
    assert not _no_empty_rows(_any_last(holed))
    visible = _any_last(full)
    with FakeTensorMode() as fake:
        assert not _no_empty_rows(fake.from_tensor(visible))  # no values: keep the guard
    assert not _no_empty_rows(torch.ones(2, 1, 1, 1, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("mask_name", ["pad_2d", "per_head_4d", "bcast_3d_t1", "float_3d"])
def test_skipping_the_guard_changes_nothing_when_every_row_sees_something(
    monkeypatch: pytest.MonkeyPatch, mask_name: str, need_weights: bool
) -> None:
    module, text, image, mask = make_case(CONFIGS[1].values[0], mask_name)
    assert mask is not None
    b, t, i, _, _, h, *_ = CONFIGS[1].values[0]
    mask = mask.clone()
    mask[..., 0] = 1  # every query head sees image token 0: no empty row
    assert not dead_rows(mask, b, h, t, i).any()
    module.absorb_projections = False
    skipped = module(text, image, mask, need_weights=need_weights)
    monkeypatch.setattr(xmodal.attention, "_no_empty_rows", lambda visible: False)
    guarded = module(text, image, mask, need_weights=need_weights)
    assert torch.equal(skipped[0], guarded[0])
    if need_weights:
        assert torch.equal(skipped[1], guarded[1])


# --------------------------------------------------------------------------------------------
# Keys and values copied contiguous for SDPA in float32 on CPU, from 128 query rows
# --------------------------------------------------------------------------------------------


def test_contiguous_kv_rule() -> None:
    from xmodal.attention import CONTIGUOUS_KV_MIN_QUERIES, _contiguous_kv_is_faster

    n = CONTIGUOUS_KV_MIN_QUERIES
    q = torch.randn(1, 2, n, 4)
    assert _contiguous_kv_is_faster(q, n, grad=False)
    assert not _contiguous_kv_is_faster(q, n - 1, grad=False)  # one or two query blocks
    assert not _contiguous_kv_is_faster(q, n, grad=True)  # training: not measured
    assert not _contiguous_kv_is_faster(q.bfloat16(), n, grad=False)  # bf16 packs its blocks
    assert not _contiguous_kv_is_faster(q.double(), n, grad=False)
    assert not _contiguous_kv_is_faster(q.to("meta"), n, grad=False)


@pytest.mark.parametrize("t", [127, 128])
def test_contiguous_kv_gives_the_same_context(monkeypatch: pytest.MonkeyPatch, t: int) -> None:
    # The copy changes where SDPA reads from, not what it computes: bit for bit the same.
    b, h, i, d = 2, 4, 9, 8
    kv = torch.randn(b, i, 2, h, d).permute(2, 0, 3, 1, 4)  # (2, b, h, i, d): the stacked views
    k, v = kv.unbind(0)
    q = torch.randn(b, t, h, d).transpose(1, 2)
    mask = torch.rand(b, 1, 1, i) < 0.7
    mask[:, ..., 0] = True
    seen: list[tuple[bool, bool]] = []
    original = F.scaled_dot_product_attention

    def spy(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
        seen.append((k.is_contiguous(), v.is_contiguous()))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        got, _ = attend(q, k, v, mask)
        want, _ = attend(q, k.contiguous(), v.contiguous(), mask)
    assert seen[0] == ((True, True) if t >= 128 else (False, False))
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# The empty-row guard is left to SDPA where SDPA zeroes such rows itself
# --------------------------------------------------------------------------------------------


def _softmax_sdpa(fill: float) -> Callable[..., Tensor]:
    """An SDPA stand-in that fills masked scores with ``fill`` (NaN or uniform rows)."""

    def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, **kwargs: Any) -> Tensor:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~attn_mask, fill)
        return torch.softmax(scores, -1) @ v

    return sdpa


@pytest.mark.parametrize("grad", [False, True])
def test_the_question_about_empty_rows_tells_kernels_apart(grad: bool) -> None:
    from xmodal.attention import _ask_sdpa_about_empty_rows

    ask = functools.partial(_ask_sdpa_about_empty_rows, torch.float32, grad, False, True)
    assert not ask(_softmax_sdpa(float("-inf")))  # 0/0: NaN rows
    assert not ask(_softmax_sdpa(-1e9))  # the notebook's fill: uniform rows, not zero
    assert ask(
        lambda q, k, v, **kw: _softmax_sdpa(-1e9)(q, k, v, **kw) * kw["attn_mask"].any(-1, True)
    )


def test_sdpa_is_asked_once_per_setting_and_leaves_the_random_stream_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[Any, ...]] = []
    original = xmodal.attention._ask_sdpa_about_empty_rows

    def counted(*setting: Any) -> bool:
        asked.append(setting)
        return original(*setting)

    monkeypatch.setattr(xmodal.attention, "_SDPA_ZEROES_EMPTY_ROWS", {})
    monkeypatch.setattr(xmodal.attention, "_ask_sdpa_about_empty_rows", counted)
    ask = xmodal.attention._sdpa_zeroes_empty_rows
    q = torch.randn(1, 2, 3, 4)
    state = torch.get_rng_state()
    first = ask(q, False, True, False)  # dropout draws random numbers inside the question
    assert torch.equal(torch.get_rng_state(), state)
    assert ask(q, False, True, False) == first
    ask(q.double(), True, False, False)
    assert asked == [(torch.float32, False, True, False), (torch.float64, True, False, False)]
    assert not ask(q.to("meta"), False, False, False)  # other devices: the guard runs


@pytest.mark.parametrize("value_bias", [False, True])
def test_attend_leaves_the_guard_to_sdpa_only_where_it_zeroes_empty_rows(
    monkeypatch: pytest.MonkeyPatch, value_bias: bool
) -> None:
    calls: list[int] = []
    original = xmodal.attention._any_last

    def counted(mask: Tensor) -> Tensor:
        calls.append(1)
        return original(mask)

    monkeypatch.setattr(xmodal.attention, "_any_last", counted)
    q = torch.randn(2, 4, 3, 8, requires_grad=True)
    k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    mask = torch.rand(2, 1, 1, 5) < 0.6
    mask[1] = False  # the second batch element sees nothing
    bias = torch.randn(32) if value_bias else None
    context, _ = attend(q, k, v, mask, value_bias=bias)
    asked = xmodal.attention._sdpa_zeroes_empty_rows(q, True, False, False)
    assert calls == ([] if asked and not value_bias else [1])  # a value bias needs the guard
    assert (context[1] == 0).all()
    context.square().sum().backward()
    assert q.grad is not None
    assert q.grad.isfinite().all()
    assert (q.grad[1] == 0).all()
    monkeypatch.setattr(xmodal.attention, "_sdpa_zeroes_empty_rows", lambda *args: False)
    guarded, _ = attend(q, k, v, mask, value_bias=bias)
    assert torch.equal(context, guarded)


@pytest.mark.parametrize(
    ("biases", "qk_norm"), [("own", False), ("own", True), ("none", False), ("value", False)]
)
def test_project_kv_contiguous_gives_the_same_keys_and_values(biases: str, qk_norm: bool) -> None:
    module = make_module(16, 4, k=2, qk_norm=qk_norm)
    image = torch.randn(2, 9, 16)
    key_bias, value_bias = module.image_key.bias, module.image_value.bias
    assert key_bias is not None
    assert value_bias is not None
    given = {"own": None, "none": (None, None), "value": (None, value_bias)}[biases]
    with torch.no_grad():
        views = module._project_kv(image, given)
        copies = module._project_kv(image, given, contiguous=True)
    assert all(copy_.is_contiguous() for copy_ in copies)
    torch.testing.assert_close(copies[1], views[1], rtol=0, atol=0)
    if biases == "value":
        # one stacked product brings the key bias along (the softmax cancels it); the copies
        # come from two products, without it
        torch.testing.assert_close(
            views[0] - copies[0], key_bias.view(1, 2, 1, 4).expand_as(views[0])
        )
    else:
        torch.testing.assert_close(copies[0], views[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("t", "dtype", "copied"),
    [(128, torch.float32, True), (127, torch.float32, False), (128, torch.bfloat16, False)],
)
def test_forward_hands_attend_contiguous_keys_and_values_where_sdpa_reads_them_faster(
    monkeypatch: pytest.MonkeyPatch, t: int, dtype: torch.dtype, copied: bool
) -> None:
    seen: list[bool] = []
    original = xmodal.attention.attend

    def spy(q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(k.is_contiguous() and v.is_contiguous())
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(xmodal.attention, "attend", spy)
    module = make_module(16, 4, dtype=dtype)
    text, image = torch.randn(1, t, 16, dtype=dtype), torch.randn(1, 9, 16, dtype=dtype)
    with torch.no_grad():
        module(text, image, need_weights=False)
    assert seen == [copied]
