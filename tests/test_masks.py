"""Tests of ``xmodal.masks.normalize_attention_mask``: keep-masks of rank 2/3/4 to rank-4 bool.

Legend: ``b`` batch, ``h`` heads, ``t`` text tokens (queries), ``i`` image tokens (keys).

The yardstick is ``reference.naive.keep_mask``, which spells a mask out entry by entry.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.naive import keep_mask
from torch import Tensor

from xmodal.masks import normalize_attention_mask

B, H, T, I = 2, 4, 3, 5  # noqa: E741
SIZES = {"batch_size": B, "num_heads": H, "text_len": T, "image_len": I}


def normalize(mask: object, **overrides: object) -> Tensor | None:
    return normalize_attention_mask(mask, **{**SIZES, **overrides})  # type: ignore[arg-type]


def test_none_stays_none() -> None:
    assert normalize(None) is None


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((B, I), (B, 1, 1, I)),
        ((1, I), (1, 1, 1, I)),
        ((B, T, I), (B, 1, T, I)),
        ((1, T, I), (1, 1, T, I)),
        ((B, 1, I), (B, 1, 1, I)),
        ((B, H, T, I), (B, H, T, I)),
        ((1, H, 1, I), (1, H, 1, I)),
        ((B, 1, T, I), (B, 1, T, I)),
        ((1, 1, 1, I), (1, 1, 1, I)),
    ],
)
def test_shapes_broadcast_without_copies(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    mask = torch.rand(shape) < 0.5
    out = normalize(mask)
    assert out is not None
    assert out.dtype == torch.bool
    assert out.shape == expected
    assert out.data_ptr() == mask.data_ptr()  # a boolean mask is viewed, never copied
    torch.testing.assert_close(out.expand(B, H, T, I), keep_mask(mask, B, H, T, I))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8]
)
def test_numeric_masks_nonzero_means_keep(dtype: torch.dtype) -> None:
    values = torch.tensor([0, 1, 3, 0, 2]).to(dtype)
    if dtype.is_floating_point:
        values = torch.tensor([0.0, 1.0, -2.5, 0.0, 0.25]).to(dtype)  # negative = keep too
    mask = torch.stack([values, values.flip(0)])  # (b, i)
    out = normalize(mask)
    assert out is not None
    assert out.dtype == torch.bool
    assert out.shape == (B, 1, 1, I)
    assert torch.equal(out[:, 0, 0], mask != 0)
    # compared with zero once, at the mask's own size: no (b, h, t, i) tensor is made
    assert out.numel() == mask.numel()


def test_empty_image_mask() -> None:
    out = normalize(torch.ones(B, 0, dtype=torch.bool), image_len=0)
    assert out is not None
    assert out.shape == (B, 1, 1, 0)


def test_device_check_uses_the_given_device() -> None:
    mask = torch.ones(B, I, dtype=torch.bool)
    assert normalize(mask, device=torch.device("cpu")) is not None
    with pytest.raises(ValueError, match=r"attention_mask is on meta, but the features are on cpu"):
        normalize(mask.to("meta"), device=torch.device("cpu"))


ERRORS = [
    ("rank 1", torch.ones(I, dtype=torch.bool), ValueError,
     r"attention_mask must have rank 2 \(b, i\), 3 \(b, t, i\) or 4 \(b, h, t, i\); got rank 1 "
     r"with shape \(5\) for scores of shape \(b, h, t, i\) = \(2, 4, 3, 5\)"),
    ("rank 0", torch.tensor(True), ValueError, r"got rank 0 with shape \(\)"),
    ("rank 5", torch.ones(B, 1, H, T, I), ValueError, r"got rank 5 with shape \(2, 1, 4, 3, 5\)"),
    ("2-D image len", torch.ones(B, I + 1), ValueError,
     r"attention_mask has shape \(2, 6\), expected \(b\|1, i\) with b=2, h=4, t=3, i=5 "
     r"\(a size of 1 broadcasts, except i\)"),
    ("2-D i does not broadcast", torch.ones(B, 1), ValueError,
     r"attention_mask has shape \(2, 1\), expected \(b\|1, i\)"),
    ("2-D batch", torch.ones(3, I), ValueError, r"attention_mask has shape \(3, 5\)"),
    ("3-D text len", torch.ones(B, T + 1, I), ValueError,
     r"attention_mask has shape \(2, 4, 5\), expected \(b\|1, t\|1, i\) with b=2, h=4, t=3, i=5"),
    ("3-D is not (h, t, i)", torch.ones(H, T, I), ValueError,
     r"attention_mask has shape \(4, 3, 5\), expected \(b\|1, t\|1, i\)"),
    ("4-D heads", torch.ones(B, H + 1, T, I), ValueError,
     r"attention_mask has shape \(2, 5, 3, 5\), expected \(b\|1, h\|1, t\|1, i\)"),
    ("4-D batch", torch.ones(B + 1, H, T, I), ValueError,
     r"attention_mask has shape \(3, 4, 3, 5\)"),
    ("complex", torch.ones(B, I, dtype=torch.complex64), TypeError,
     r"attention_mask must be boolean or real-valued, got dtype torch.complex64"),
    ("list", [[1] * I] * B, TypeError, r"attention_mask must be a torch.Tensor or None, got list"),
    ("numpy-like", 1.0, TypeError, r"attention_mask must be a torch.Tensor or None, got float"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mask", "error", "message"), [pytest.param(*case[1:], id=case[0]) for case in ERRORS]
)
def test_errors_name_the_argument_and_shapes(
    mask: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        normalize(mask)


def test_errors_use_the_given_name() -> None:
    with pytest.raises(ValueError, match=r"^media_mask has shape \(2, 6\)"):
        normalize(torch.ones(B, I + 1), name="media_mask")


@st.composite
def masks(draw: st.DrawFn) -> tuple[Tensor, tuple[int, int, int, int]]:
    b, h, t, i = (draw(st.integers(1, 3)) for _ in range(4))
    rank = draw(st.sampled_from([2, 3, 4]))
    full = {2: (b, i), 3: (b, t, i), 4: (b, h, t, i)}[rank]
    shape = (*tuple(draw(st.sampled_from([1, n])) for n in full[:-1]), i)
    numel = 1
    for s in shape:
        numel *= s
    values = draw(st.lists(st.sampled_from([0, 1, -3]), min_size=numel, max_size=numel))
    dtype = draw(st.sampled_from([torch.bool, torch.float32, torch.int32]))
    return torch.tensor(values).reshape(shape).to(dtype), (b, h, t, i)


@settings(max_examples=25, deadline=None)
@given(case=masks())
def test_hypothesis_matches_reference(case: tuple[Tensor, tuple[int, int, int, int]]) -> None:
    mask, (b, h, t, i) = case
    out = normalize_attention_mask(mask, batch_size=b, num_heads=h, text_len=t, image_len=i)
    assert out is not None
    assert out.dtype == torch.bool
    assert out.dim() == 4
    for size, full in zip(out.shape, (b, h, t, i), strict=True):
        assert size in (1, full)
    assert torch.equal(out.expand(b, h, t, i), keep_mask(mask, b, h, t, i))
