"""Masks prepared once (``xmodal.prepare_attention_mask``) give what the raw mask gives, cheaper.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``k`` key/value heads.

A :class:`~xmodal.PreparedMask` is checked, broadcast and laid out once (its rows that see
nothing found, its additive form for SDPA made), then read by every layer and decoding step.
These tests check that every path gives the raw mask's output bit for bit, that the per-call
work is really skipped, and that a mask prepared for other sizes or another device is refused.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_attention import CONFIGS, MASK_NAMES, MASKS, make_case
from torch import Tensor

import xmodal.attention
import xmodal.blocks
import xmodal.masks
from xmodal import (
    GatedCrossAttentionBlock,
    PreparedMask,
    attend,
    media_attention_mask,
    prepare_attention_mask,
)


def prepared_for(mask: Tensor | None, b: int, h: int, t: int, i: int, **kw: Any) -> PreparedMask:
    out = prepare_attention_mask(mask, batch_size=b, num_heads=h, text_len=t, image_len=i, **kw)
    assert out is not None
    return out


# --------------------------------------------------------------------------------------------
# The same outputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("mask_name", [m for m in MASK_NAMES if m != "none"])
@pytest.mark.parametrize("config", CONFIGS)
def test_prepared_mask_gives_the_raw_masks_output(
    config: tuple, mask_name: str, need_weights: bool
) -> None:
    module, text, image, mask = make_case(config, mask_name)
    b, t, i, _, _, h, *_ = config
    prepared = prepared_for(mask, b, h, t, i)
    for absorb in (True, False):  # short text: the absorbed path where it is cheaper
        module.absorb_projections = absorb
        want = module(text, image, mask, need_weights=need_weights)
        got = module(text, image, prepared, need_weights=need_weights)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        if need_weights:
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("mask_name", ["pad_2d", "pad_2d_empty_element", "per_query_3d"])
def test_prepared_mask_gives_the_raw_masks_gradients(mask_name: str) -> None:
    module, text, image, mask = make_case(CONFIGS[0].values[0], mask_name)
    b, t, i, _, _, h, *_ = CONFIGS[0].values[0]
    prepared = prepared_for(mask, b, h, t, i)
    module.absorb_projections = False

    def grads(m: Tensor | PreparedMask | None) -> list[Tensor]:
        x, y = text.clone().requires_grad_(True), image.clone().requires_grad_(True)
        out, _ = module(x, y, m, need_weights=False)
        return list(torch.autograd.grad(out.square().sum(), (x, y, *module.parameters())))

    for got, want in zip(grads(prepared), grads(mask), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_mask_prepared_in_another_dtype_still_serves() -> None:
    # prepared for float32, read by a bf16 module: the boolean form goes to SDPA instead
    module, text, image, mask = make_case(CONFIGS[0].values[0], "pad_2d_empty_element")
    b, t, i, _, _, h, *_ = CONFIGS[0].values[0]
    module = copy.deepcopy(module).bfloat16()
    module.absorb_projections = False
    prepared = prepared_for(mask, b, h, t, i)
    assert prepared.additive.dtype == torch.float32
    text, image = text.bfloat16(), image.bfloat16()
    want, _ = module(text, image, mask, need_weights=False)
    got, _ = module(text, image, prepared, need_weights=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mask_name", ["pad_2d", "per_query_3d", "per_head_4d", "all_masked"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("route", ["fused", "explicit", "math"])
def test_attend_reads_a_prepared_mask(route: str, kv_heads: int, mask_name: str) -> None:
    b, h, t, i, d = 2, 4, 3, 6, 5
    q = torch.randn(b, h, t, d)
    k, v = torch.randn(b, kv_heads, i, d), torch.randn(b, kv_heads, i, d)
    raw = MASKS[mask_name](b, h, t, i, torch.Generator().manual_seed(2))
    prepared = prepared_for(raw, b, h, t, i)
    kwargs = {"need_weights": route == "explicit", "force_math": route == "math"}
    want = attend(q, k, v, prepared.keep, **kwargs)
    got = attend(q, k, v, prepared, **kwargs)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    if route == "explicit":
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["immediate", "all_previous"])
def test_gated_block_reads_a_prepared_mask(policy: str) -> None:
    block = GatedCrossAttentionBlock(16, num_heads=2, head_dim=8, gate_init=0.7).eval()
    text, media = torch.randn(2, 7, 16), torch.randn(2, 2 * 3, 16)
    locations = torch.zeros(2, 7, dtype=torch.bool)
    locations[0, [1, 4]] = True
    locations[1, 3] = True  # tokens before the first image see nothing: they pass through
    mask = media_attention_mask(locations, 3, num_media=2, policy=policy)  # type: ignore[arg-type]
    prepared = prepared_for(mask, 2, 2, 7, 6)
    assert prepared.empty_rows
    torch.testing.assert_close(
        block(text, media, prepared), block(text, media, mask), rtol=0, atol=0
    )


# --------------------------------------------------------------------------------------------
# What it holds, and what a call no longer does
# --------------------------------------------------------------------------------------------


def test_prepared_mask_holds_the_normalised_mask_its_rows_and_sdpas_form() -> None:
    raw = torch.tensor([[1, 0, 1], [0, 0, 0]])  # int (b, i): the second sample sees nothing
    prepared = prepared_for(raw, 2, 4, 5, 3)
    assert prepared.keep.dtype == torch.bool
    assert prepared.keep.shape == (2, 1, 1, 3)
    assert prepared.visible.shape == (2, 1, 1, 1)
    assert prepared.visible.view(-1).tolist() == [True, False]
    assert prepared.empty_rows
    assert prepared.additive.view(2, 3).tolist() == [[0, float("-inf"), 0], [float("-inf")] * 3]
    assert not prepared_for(raw[:1], 1, 4, 5, 3).empty_rows
    assert prepare_attention_mask(None, batch_size=2, num_heads=4, text_len=5, image_len=3) is None
    assert (
        prepare_attention_mask(prepared, batch_size=2, num_heads=4, text_len=5, image_len=3)
        is prepared
    )
    with pytest.raises(ValueError, match=r"does not fit scores"):
        prepare_attention_mask(prepared, batch_size=2, num_heads=4, text_len=5, image_len=4)


def test_a_call_skips_the_work_done_when_the_mask_was_prepared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module, text, image, mask = make_case(CONFIGS[0].values[0], "pad_2d_empty_element")
    b, t, i, _, _, h, *_ = CONFIGS[0].values[0]
    prepared = prepared_for(mask, b, h, t, i)
    module.absorb_projections = False
    calls: list[str] = []

    def spy(name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return counted

    monkeypatch.setattr(
        xmodal.masks,
        "normalize_attention_mask",
        spy("normalize", xmodal.masks.normalize_attention_mask),
    )
    monkeypatch.setattr(xmodal.attention, "_any_last", spy("any", xmodal.attention._any_last))
    module(text, image, mask, need_weights=False)  # the value bias needs the empty rows found
    assert calls == ["normalize", "any"]
    calls.clear()
    module(text, image, prepared, need_weights=False)
    assert calls == []
    block = GatedCrossAttentionBlock(16, num_heads=h, head_dim=4).eval()
    monkeypatch.setattr(xmodal.blocks, "any_last", spy("block any", xmodal.blocks.any_last))
    block(text, image, prepared)
    assert calls == []


# --------------------------------------------------------------------------------------------
# Refused where it does not fit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((2, 4, 4, 5), r"prepared as \(2, 1, 3, 5\), which does not fit scores of shape "
                       r"\(b, h, t, i\) = \(2, 4, 4, 5\)"),
        ((2, 4, 3, 6), r"does not fit scores of shape \(b, h, t, i\) = \(2, 4, 3, 6\)"),
        ((3, 4, 3, 5), r"does not fit"),
    ],
)  # fmt: skip
def test_a_mask_prepared_for_other_sizes_is_refused(sizes: tuple, message: str) -> None:
    module, _, _, mask = make_case(CONFIGS[0].values[0], "per_query_3d")  # (2, 3, 5)
    prepared = prepared_for(mask, 2, 4, 3, 5)
    b, t, i = sizes[0], sizes[2], sizes[3]
    with pytest.raises(ValueError, match=message):
        module(torch.randn(b, t, 16), torch.randn(b, i, 16), prepared)


def test_a_broadcast_prepared_mask_fits_any_batch_and_heads() -> None:
    module, text, image, _ = make_case(CONFIGS[0].values[0], "none")
    keep = torch.tensor([[True, True, False, True, False]])  # (1, i): every sample alike
    prepared = prepared_for(keep, 1, 1, 3, 5)
    want, _ = module(text, image, keep, need_weights=False)
    got, _ = module(text, image, prepared, need_weights=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_mask_prepared_on_another_device_is_refused() -> None:
    module, text, image, mask = make_case(CONFIGS[0].values[0], "pad_2d")
    prepared = prepared_for(mask.to("meta"), 2, 4, 3, 5)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"attention_mask is on meta, but the features are on cpu"):
        module(text, image, prepared)


def test_preparing_checks_the_mask_as_a_call_would() -> None:
    with pytest.raises(TypeError, match=r"attention_mask must be a torch.Tensor or None"):
        prepare_attention_mask([1, 0], batch_size=1, num_heads=1, text_len=1, image_len=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\), expected"):
        prepare_attention_mask(
            torch.ones(2, 4, dtype=torch.bool), batch_size=2, num_heads=1, text_len=1, image_len=5
        )


def test_the_absorbed_path_reads_the_prepared_bias_and_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module, text, image, mask = make_case(CONFIGS[0].values[0], "pad_2d")
    b, t, i, _, _, h, *_ = CONFIGS[0].values[0]
    assert mask is not None
    mask[:, 0] = True  # no empty row: neither a bias to build nor rows to zero
    prepared = prepared_for(mask, b, h, t, i)
    assert not prepared.empty_rows
    monkeypatch.setattr(xmodal.attention, "absorbed_is_cheaper", lambda **kw: True)
    assert module.which_path(text, image, need_weights=False) == "absorbed"
    want, _ = module(text, image, mask, need_weights=False)
    calls: list[str] = []
    for name in ("_any_last", "_mask_bias"):
        original = getattr(xmodal.attention, name)
        monkeypatch.setattr(
            xmodal.attention, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)
        )
    got, _ = module(text, image, prepared, need_weights=False)
    assert calls == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # exp(-inf) and exp(min/2): both 0
