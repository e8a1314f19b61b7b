"""Cross-modal attention: text tokens (queries) attend to image features (keys and values).

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` query heads, ``k`` key/value
heads (``h`` is a multiple of ``k``; ``g = h // k`` query heads share one key/value head),
``d`` head width, ``D`` text width, ``E`` image width.

There is one attention core, :func:`attend`, with two paths:

* the **fused** path (``need_weights=False``) calls ``scaled_dot_product_attention`` and never
  materialises the ``b·h·t·i`` scores (except in bf16 training on CPU, where the math is
  faster than SDPA's backward and runs instead while the scores are small; see
  :func:`_math_is_faster`);
* the **explicit** path (``need_weights=True``) computes the scores, takes a float32 softmax and
  returns the probabilities, for people who want to look at them.

Both paths give a zero context vector -- and all-zero weights -- to a query that may see no
image token, in forward and backward, in every dtype; neither ever produces NaN for it.

Around the core, :class:`CrossModalAttention` has one more way to spend fewer FLOPs for short
text: the **absorbed** path (see :meth:`CrossModalAttention._attend_absorbed` and
:func:`absorbed_is_cheaper`) folds the key projection into the queries and applies the value
projection after the weighted sum, so no keys or values are computed at all. It runs the same
masked softmax as the core's math path on the raw image features and keeps the same rule for
queries that see nothing. Where keys and values are projected, inference does it with one GEMM:
the two projections' weights are kept side by side in memory (each still its own parameter),
so they can be read as one stacked weight, as ``nn.MultiheadAttention``'s packed projection is
(see :meth:`CrossModalAttention._project_kv`). Their biases stay out of that product where it
pays: the softmax cancels the key bias, and the value bias is added to the fewer context rows
instead (see :meth:`CrossModalAttention._kv_biases_after`).
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from xmodal.masks import PreparedMask, mask_for_call
from xmodal.masks import any_last as _any_last

__all__ = [
    "ABSORB_MAX_COST_RATIO",
    "CrossModalAttention",
    "ImageKV",
    "absorbed_is_cheaper",
    "absorption_costs",
    "attend",
]


@dataclass
class ImageKV:
    """Projected image keys and values, ready to be attended to again and again.

    Made by :meth:`CrossModalAttention.encode_image`; pass it as ``image_kv=`` to skip the key
    and value projections (and the key norm) at every decoding step. Keys are stored after the
    optional q/k-norm, at the key/value head count (so a GQA layer caches ``k`` heads, not
    ``h``).

    Attributes:
        key: ``(b, k, i, d)``
        value: ``(b, k, i, d)``
    """

    key: Tensor
    value: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.key, Tensor) or not isinstance(self.value, Tensor):
            raise TypeError(
                f"ImageKV.key and ImageKV.value must be tensors, got "
                f"{type(self.key).__name__} and {type(self.value).__name__}"
            )
        if self.key.dim() != 4 or self.key.shape != self.value.shape:
            raise ValueError(
                f"ImageKV.key and ImageKV.value must both have shape (b, k, i, d), got "
                f"{tuple(self.key.shape)} and {tuple(self.value.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.key.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def image_len(self) -> int:
        return self.key.shape[2]

    @property
    def head_dim(self) -> int:
        return self.key.shape[3]

    def extend(self, other: ImageKV) -> ImageKV:
        """Append ``other``'s image tokens after this cache's: a new image mid-conversation.

        The earlier images are not projected again; only the new one needs
        :meth:`CrossModalAttention.encode_image`. Masks must grow by ``other.image_len``
        columns to match.
        """
        if not isinstance(other, ImageKV):
            raise TypeError(f"other must be an ImageKV, got {type(other).__name__}")
        if (self.batch_size, self.num_kv_heads, self.head_dim) != (
            other.batch_size,
            other.num_kv_heads,
            other.head_dim,
        ):
            raise ValueError(
                f"cannot extend an ImageKV of shape {tuple(self.key.shape)} with one of shape "
                f"{tuple(other.key.shape)}: batch, heads and head width must match"
            )
        return ImageKV(
            torch.cat([self.key, other.key], dim=2),  # (b, k, i + i', d)
            torch.cat([self.value, other.value], dim=2),
        )


# lets torch.export take an ImageKV as an input (older torch: no register_dataclass)
with contextlib.suppress(AttributeError, ValueError):
    torch.export.register_dataclass(ImageKV)


def _fold_groups(q: Tensor, mask: Tensor | None, num_kv_heads: int) -> tuple[Tensor, Tensor | None]:
    """Fold the ``g`` query heads that share a key/value head into the query axis.

    Cross-attention has no causal structure, so the ``g`` query heads of a group are just ``g·t``
    queries against the same keys: ``(b, h, t, d) -> (b, k, g·t, d)``. This serves grouped-query
    attention with the K/V heads as they are -- no ``repeat_interleave`` of keys and values.

    A mask that varies per query has to be copied ``g`` times to follow the fold, so on CPU's
    fused path :func:`attend` hands such masks (with ``t > 1``) to SDPA's ``enable_gqa`` instead,
    which the CPU flash kernel takes natively. Measured (benchmarks/bench_decode.py --gqa; quiet
    Xeon with AMX, 2 threads, torch 2.11; h=32, k=8, d=128, b=1; medians in ms, fp32 (bf16);
    the full grid is in docs/generation.md):

    ``i = 4096``         no mask, t=1    no mask, t=512   (b, 1, t, i) mask, t=512
    fold                 2.37 (2.00)     208 (62)         259 (107)
    enable_gqa           4.61 (2.75)     233 (69)         242 (85)
    repeat_interleave    52.6 (29.4)     285 (116)        295 (130)

    Without a mask or with a key-padding mask the fold is fastest or within ~10%, and 1.1-2x
    faster than ``enable_gqa`` for a decoding step; ``repeat_interleave`` is never fastest (up
    to 25x slower at ``t = 1``). The fold also serves the explicit path and every device.
    """
    b, h, t, d = q.shape
    g = h // num_kv_heads
    q = q.reshape(b, num_kv_heads, g * t, d)  # (b, k, g·t, d)
    if mask is not None:
        mb, mh, mt, i = mask.shape
        if mh == 1 and mt == 1:
            pass  # (b|1, 1, 1, i) broadcasts over g·t as it is
        elif mh == 1:  # the same for every head: g copies of each row, not h
            mask = mask.expand(mb, g, t, i).reshape(mb, 1, g * t, i)  # (b|1, 1, g·t, i)
        else:
            mask = mask.expand(mb, h, t, i).reshape(mb, num_kv_heads, g * t, i)
    return q, mask


def _no_empty_rows(visible: Tensor) -> bool:
    """Whether every row of a keep-mask sees something (``visible`` from :func:`_any_last`).

    Then :func:`attend` leaves out its guard for rows that see nothing (a 0/0 softmax): the
    ``mask | ~visible`` for SDPA, the zeroing of those rows' context, and with weights a pass
    over all ``b·h·t·i`` probabilities (1-3% of a masked notebook-shape call). Asked only where
    the answer is cheap: eagerly, on CPU. While compiling or exporting, on other devices (a
    host sync), or for tensors without values (fake, vmapped), it answers ``False`` and the
    guard runs.
    """
    if (
        visible.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    ):
        return False
    try:
        return bool(visible.all())
    except RuntimeError:  # no values to look at
        return False


# (dtype, grad, dropout, enable_gqa) -> whether SDPA on CPU zeroes rows that see nothing itself
_SDPA_ZEROES_EMPTY_ROWS: dict[tuple[torch.dtype, bool, bool, bool], bool] = {}


def _sdpa_zeroes_empty_rows(q: Tensor, grad: bool, dropout: bool, gqa: bool) -> bool:
    """Whether SDPA gives a query whose mask row is all ``False`` a zero output by itself, and
    finite gradients (zero for that query) where ``grad``.

    Then :func:`attend` leaves out its own guard for such rows (``mask.any``, ``mask | ~visible``
    and zeroing their context): one thread, bf16, notebook shape with a key-padding mask, 60 us
    of a 1.2 ms call. torch 2.13's CPU kernels do it (the flash kernel, forward and backward,
    and the math fallback that dropout takes); earlier ones gave NaN. Rather than trust a
    version number, the kernel is asked once per process and setting, on a small input with
    empty rows in several query blocks, without touching the random-number stream. On other
    devices (whose SDPA backends vary with the shape), while compiling or exporting, the answer
    is ``False``: the guard runs.
    """
    if q.device.type != "cpu" or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    setting = (q.dtype, grad, dropout, gqa)
    known = _SDPA_ZEROES_EMPTY_ROWS.get(setting)
    if known is None:
        known = _SDPA_ZEROES_EMPTY_ROWS[setting] = _ask_sdpa_about_empty_rows(*setting)
    return known


def _ask_sdpa_about_empty_rows(
    dtype: torch.dtype,
    grad: bool,
    dropout: bool,
    gqa: bool,
    sdpa: Callable[..., Tensor] = torch.ops.aten.scaled_dot_product_attention,
) -> bool:
    """Run ``sdpa`` on CPU on rows that see nothing and check that they come out zero.

    See :func:`_sdpa_zeroes_empty_rows`. The operator itself by default, so that spies on
    ``F.scaled_dot_product_attention`` do not count the question.
    """
    b, h, t, i, d = 2, 4, 70, 40, 12  # several 32-row query blocks and a tail, a vector tail
    kv_heads = 2 if gqa else h
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(b, 1, t, i, generator=gen) < 0.5
    mask[:, :, :, 0] = True
    dead = torch.zeros(b, 1, t, 1, dtype=torch.bool)
    dead[0, :, [1, 33, 69]] = True  # in the first block, the second, and the tail
    dead[1] = True  # a whole batch element
    mask &= ~dead
    with (
        torch.random.fork_rng(devices=[]),
        torch.inference_mode(False),
        torch.enable_grad() if grad else torch.no_grad(),
    ):
        q, k, v = (
            torch.randn(b, heads, n, d, generator=gen).to(dtype).requires_grad_(grad)
            for heads, n in ((h, t), (kv_heads, i), (kv_heads, i))
        )
        try:
            out = sdpa(q, k, v, attn_mask=mask, dropout_p=0.5 if dropout else 0.0, enable_gqa=gqa)
            ok = bool(out.isfinite().all()) and bool((out * dead).eq(0).all())
            if ok and grad:
                grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
                ok = all(bool(g.isfinite().all()) for g in grads)
                ok = ok and bool((grads[0] * dead).eq(0).all())
        except RuntimeError:  # this setting is not supported at all: keep the guard
            ok = False
    return ok


def _mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive bias of the keep-mask's own (broadcast) shape: 0 to keep, ``finfo.min / 2`` not.

    Adding it to the scores is one vectorised pass; ``masked_fill`` with a broadcast mask is
    not (CPU, one thread, ``(4, 1, 160, 196)`` float32 scores and a ``(4, 1, 1, 196)`` mask:
    21 us against 140 us). Half of ``finfo.min`` so that no finite score can push a masked entry
    to ``-inf``: a row whose every entry is masked stays finite (and is zeroed afterwards), and
    ``exp`` of it minus the row's maximum is exactly 0 for a row that sees something.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min / 2
    )


def _probabilities(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the image tokens of ``(b, ·, ·, i)`` scores, masked by a keep-``mask``.

    In the scores' dtype. A visible row's masked entries come out exactly 0 (``exp`` of a huge
    negative number, see :func:`_mask_bias`); a row that sees nothing comes out finite and
    (nearly) uniform, for the caller to zero.
    """
    if mask is not None:
        scores = scores + _mask_bias(mask, scores.dtype)
    return torch.softmax(scores, dim=-1)


def _stacked(x: Tensor) -> Tensor:
    """``(b, k, r, c) -> (b·k, r, c)``, row-major matrices: the operand layout ``bmm`` is fast on.

    ``torch.matmul`` on the strided views the projections give (heads split off the feature
    axis) is slow in bf16 on CPU: one thread, ``b1 h16 t256 i1601 d64``, the scores took
    12.2 ms through ``matmul`` against 2.0 ms on contiguous operands (the copies included
    here cost far less). Row-major ``(r, c)`` blocks, with ``k`` transposed as a view, are the
    layout measured fast in both dtypes.
    """
    return x.flatten(0, 1).contiguous()


# Largest b·h·t·i for which bf16 CPU training takes the math path (see _math_is_faster):
# its float32 scores take 4 bytes each, 64 MiB at this size.
MATH_TRAINING_MAX_SCORES = 1 << 24


def _math_is_faster(x: Tensor, grad: bool, num_scores: int) -> bool:
    """Whether the fused path should run the math (matmul, softmax, matmul) instead.

    Only for bf16 training on CPU (``grad``: autograd will need a backward): SDPA's CPU flash
    kernel has a slow bf16 backward, where matmul + softmax (computed in float32) + matmul is
    faster forward+backward (``xmodal bench``; figures in docs/benchmarks.md). It materialises
    the ``b·h·t·i`` scores, as training with the explicit path does anyway, so only up to
    :data:`MATH_TRAINING_MAX_SCORES` of them. Inference, float32 and float16 (not measured)
    keep SDPA, whose memory grows with ``t + i``.
    """
    # ``x`` (the queries) gives the dtype and device; the cheap tests go first, as inference
    # asks this on every call
    return (
        grad
        and x.dtype == torch.bfloat16
        and num_scores <= MATH_TRAINING_MAX_SCORES
        and x.device.type == "cpu"
    )


# Query rows per key/value head from which SDPA on CPU runs faster, in float32, on keys and values
# copied contiguous than on the strided views the projections give (see _contiguous_kv_is_faster)
CONTIGUOUS_KV_MIN_QUERIES = 128


def _contiguous_kv_is_faster(x: Tensor, query_rows: int, grad: bool) -> bool:
    """Whether the fused path should copy keys and values contiguous before SDPA.

    SDPA's CPU flash kernel reads the keys and values once per block of query rows (32 to 256
    of them), straight from their strides in float32. On the views that split heads off the
    projections, each head's ``d``-wide rows lie ``k·d`` apart (``2·k·d`` from the stacked K/V
    product), so every pass gathers them again. From a few query blocks on, one copy costs
    less. One thread, ``benchmarks/bench_kv_layout.py``, SDPA plus the copy against SDPA on the
    views, float32: 1.03-1.22x as fast from 128 query rows (``t256 i4096 D1024 h16`` 1.22x,
    ``t2048 i4096`` 1.15x, ``t2048 i576 h8 d128`` 1.03x), 0.98x at 96, 0.90x at 64 and 0.70x
    at 32 (one or two blocks: the copy is pure cost). In bf16 the kernel packs its blocks
    itself and the copy only costs (0.66-0.97x), so only float32 inference; training, other
    dtypes and other devices are not measured.

    Args:
        x: the queries, keys or values (for their dtype and device).
        query_rows: query rows per key/value head (``g·t`` where groups are folded).
        grad: whether autograd will need a backward.
    """
    return (
        not grad
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and statically_known_true(query_rows >= CONTIGUOUS_KV_MIN_QUERIES)  # no guard if symbolic
    )


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | PreparedMask | None = None,
    *,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    scale: float | None = None,
    force_math: bool = False,
    value_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention with xmodal's masking rules. The one attention core.

    Args:
        q: queries ``(b, h, t, d)``.
        k, v: keys and values ``(b, k, i, d)``; ``h`` must be a multiple of ``k``.
        mask: ``None``, a boolean keep-mask broadcastable to ``(b, h, t, i)`` of rank 4
            (see :func:`xmodal.masks.normalize_attention_mask`; ``True`` = may attend), or a
            :class:`~xmodal.masks.PreparedMask` made for these sizes, whose rows that see
            nothing and additive form for SDPA were found once.
        dropout_p: dropout on the attention probabilities (pass ``0.0`` in evaluation).
        need_weights: ``False`` runs the fused kernel (or, for bf16 training on CPU, the
            faster math path; see :func:`_math_is_faster`) and returns ``None`` weights; ``True``
            runs the explicit path (softmax in float32, or float64 for float64 inputs) and
            returns the probabilities.
        scale: factor on ``q·k`` before the softmax (default ``1/sqrt(d)``).
        force_math: run matmul, softmax, matmul (the explicit path's arithmetic) even without
            weights; the absorbed path of :class:`CrossModalAttention` uses it, where the
            scores are smaller than the keys and values it avoids.
        value_bias: ``None`` or a ``(k·d,)`` bias shared by every value vector, added to the
            context instead of to ``v``: the same result, since the probabilities of a row that
            sees something sum to 1, for ``t`` context rows instead of ``i`` value rows (see
            :meth:`CrossModalAttention._project_kv`). A row that sees nothing still gets a zero
            context. Only without dropout, whose kept probabilities do not sum to 1.

    Returns:
        ``(context, weights)``: context ``(b, h, t, d)`` in ``q``'s dtype; weights
        ``(b, h, t, i)`` in ``q``'s dtype (probabilities *before* dropout) or ``None``. A query
        whose mask row is all ``False`` gets a zero context and zero weights.
    """
    b, h, t, d = q.shape
    num_kv_heads, i = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    prepared: PreparedMask | None = None
    if isinstance(mask, PreparedMask):
        prepared, mask = mask, mask.keep  # (b|1, h|1, t|1, i) bool
    if value_bias is not None:
        if dropout_p > 0:
            raise ValueError(
                f"value_bias needs dropout_p == 0 (dropped probabilities do not sum to 1), "
                f"got dropout_p={dropout_p}; add the bias to v instead"
            )
        if value_bias.shape != (num_kv_heads * v.shape[-1],):
            raise ValueError(
                f"value_bias must have shape (k·d,) = ({num_kv_heads * v.shape[-1]},) for "
                f"values of shape {tuple(v.shape)}, got {tuple(value_bias.shape)}"
            )

    if i == 0:  # nothing to see: every query gets the zero context (a static-shape branch)
        context = q.new_zeros(b, h, t, d)
        return context, (q.new_zeros(b, h, t, 0) if need_weights else None)

    # The math path instead of SDPA where it is faster: bf16 training on CPU.
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    explicit = need_weights or force_math or _math_is_faster(q, grad, b * h * t * i)

    g = h // num_kv_heads
    # GQA: fold the query groups (see _fold_groups), except on the CPU's fused path when the
    # mask varies per query or head -- folding would copy it g times; enable_gqa reads it as is.
    # (statically_known_true: a plain bool for SDPA, and no guard, under dynamic shapes too.)
    sdpa_gqa = (
        g > 1
        and not explicit
        and q.device.type == "cpu"
        and mask is not None
        and not (
            statically_known_true(mask.shape[1] == 1) and statically_known_true(mask.shape[2] == 1)
        )
    )
    if g > 1 and not sdpa_gqa:
        q, mask = _fold_groups(q, mask, num_kv_heads)  # (b, k, g·t, d)
        prepared = None  # laid out for the unfolded rows

    # A row with no visible token would be a 0/0 softmax. Let it see everything (finite, with
    # finite gradients), then zero its output: the same rule on every kernel and torch version.
    # Not needed where SDPA zeroes such rows itself (and no value bias would reach them).
    visible = None
    if mask is not None and (
        explicit
        or value_bias is not None
        or not _sdpa_zeroes_empty_rows(q, grad, dropout_p > 0, sdpa_gqa)
    ):
        if prepared is not None:  # found once, when the mask was prepared
            visible = prepared.visible if prepared.empty_rows else None
        else:
            visible = _any_last(mask)  # (b|1, ·, ·, 1)
            if _no_empty_rows(visible):
                visible = None  # nothing to guard: skip the guard's passes

    if not explicit:
        if _contiguous_kv_is_faster(q, q.shape[2], grad):
            k, v = k.contiguous(), v.contiguous()  # (b, k, i, d) row-major per head
        attn_mask = mask if mask is None or visible is None else mask | ~visible
        if prepared is not None and visible is None and prepared.additive.dtype == q.dtype:
            attn_mask = prepared.additive  # SDPA's own form, made once (-inf rows: see above)
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            scale=scale,
            enable_gqa=sdpa_gqa,
        )  # (b, k, g·t, d), or (b, h, t, d) with enable_gqa
        weights = None
    else:
        # Softmax in float32 at least: half precision is upcast, float64 keeps its precision.
        # fp16 scores would overflow past 65504, so its product is taken in float32 too; bf16
        # has float32's range and keeps its fast product. On CPU, bf16 goes into the softmax
        # as it is: the kernel computes in float32 and rounds once, so the forward is
        # bit-identical to an upcast (checked in tests) without the two casts, which took
        # 10.7 of 55.8 ms self CPU time forward+backward at b1 t256 i576 h16 (one thread).
        softmax_dtype = torch.promote_types(q.dtype, torch.float32)
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            softmax_dtype = torch.bfloat16
        qs, ks = (q.float(), k.float()) if q.dtype == torch.float16 else (q, k)
        qs = qs if scale == 1.0 else qs * scale
        scores = torch.bmm(_stacked(qs), _stacked(ks).transpose(1, 2))  # (b·k, g·t, i)
        scores = scores.view(q.shape[0], q.shape[1], q.shape[2], i).to(softmax_dtype)
        # An all-masked row comes out (nearly) uniform. Returned weights zero it; without
        # weights, the context row is zeroed below instead, cheaper than a second pass.
        probs = _probabilities(scores, mask)
        if mask is not None and visible is not None and need_weights:
            probs = probs * mask  # all-masked rows: uniform -> zero
        probs = probs.to(q.dtype)
        dropped = F.dropout(probs, p=dropout_p, training=True) if dropout_p > 0 else probs
        context = torch.bmm(_stacked(dropped), _stacked(v))  # (b·k, g·t, d)
        context = context.view(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
        weights = probs.reshape(b, h, t, i) if need_weights else None
    if value_bias is not None:  # one (d,) bias per key/value head, on each of its query rows
        context = context + _per_head(value_bias, num_kv_heads, context.shape[1])
    if visible is not None and (not need_weights or value_bias is not None):
        context = context * visible  # rows that see no image token: zero (context is finite)

    # (b, k, g·t, d) -> (b, h, t, d); split-then-merge rather than reshape, which would guard on
    # the product's strides and fail torch.export with a dynamic text length
    folded = h // context.shape[1]  # g if the groups were folded, else 1
    if folded > 1:
        context = context.unflatten(2, (folded, t)).flatten(1, 2)
    return context, weights


def _per_head(bias: Tensor, num_kv_heads: int, heads: int) -> Tensor:
    """A ``(k·d,)`` value bias as ``(1, heads, 1, d)``, to add to a ``(b, heads, ·, d)`` context.

    ``heads`` is ``k`` (query groups folded into the rows) or ``h`` (unfolded: head ``j`` reads
    key/value head ``j // g``).
    """
    bias = bias.view(1, num_kv_heads, 1, -1)
    if heads != num_kv_heads:
        bias = bias.repeat_interleave(heads // num_kv_heads, dim=1)
    return bias


# The absorbed path runs while its FLOPs are at most this fraction of the projected path's, per
# dtype it serves (see absorbed_is_cheaper). Measured on CPU, one thread, with
# benchmarks/bench_absorbed.py (docs/benchmarks.md): in float32 it is faster up to ~0.75 and
# even at 0.8; in bfloat16 its small per-head products (width d) run far below AMX speed while
# the projections it replaces run near it, so it pays only up to ~0.3. float64 follows float32
# (GEMM-bound alike). float16 is not served: scores of width E could overflow, and unmeasured.
ABSORB_MAX_COST_RATIO: dict[torch.dtype, float] = {
    torch.float32: 0.8,
    torch.float64: 0.8,
    torch.bfloat16: 0.3,
}


def absorption_costs(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    image_dim: int,
    text_len: int,
    image_len: int,
) -> tuple[int, int]:
    """FLOPs per batch element of the projected and the absorbed path, ``(projected, absorbed)``.

    The *projected* path (the usual one) computes keys and values for every image token, then
    the two attention products at head width ``d``; the *absorbed* path (see
    :meth:`CrossModalAttention._attend_absorbed`) maps each head's queries into image-feature
    space and back, and takes the two products at width ``E``::

        projected = 2·k·i·E·d  +  2·h·t·i·d        (K and V projections; q·k and p·v)
        absorbed  = 2·h·t·d·E  +  2·h·t·i·E        (q·W_k and x̄·W_v per head; q̃·x and p·x)

    The query and output projections are the same in both and left out.
    """
    h, k, d, e = num_heads, num_kv_heads, head_dim, image_dim
    t, i = text_len, image_len
    return 2 * k * i * e * d + 2 * h * t * i * d, 2 * h * t * d * e + 2 * h * t * i * e


def absorbed_is_cheaper(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    image_dim: int,
    text_len: int,
    image_len: int,
    dtype: torch.dtype = torch.float32,
) -> bool:
    """Whether :class:`CrossModalAttention` should take the absorbed path at these sizes.

    The absorbed path wins for short text: roughly ``h·t < k·d`` (``t < d`` without GQA), a
    decoding step without a cache most of all. It is taken while its FLOPs
    (:func:`absorption_costs`) are at most ``ABSORB_MAX_COST_RATIO[dtype]`` of the projected
    path's (``False`` for a dtype not in that table), and while ``h·t <= k·d``: then its
    ``h·t·i`` scores and probabilities together are no larger than the ``2·k·i·d`` keys and
    values it does not compute, so its memory, like the projected path's, grows with
    ``t + i`` and exceeds it by at most the small ``h·t·E`` query and mixed-feature tensors.
    Symbolic sizes (``torch.export`` with dynamic shapes) that cannot be decided statically
    answer ``False``.
    """
    projected, absorbed = absorption_costs(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        image_dim=image_dim,
        text_len=text_len,
        image_len=image_len,
    )
    ratio = ABSORB_MAX_COST_RATIO.get(dtype)
    if ratio is None:
        return False
    small = num_heads * text_len <= num_kv_heads * head_dim
    cheaper = absorbed <= ratio * projected
    if isinstance(small, bool) and isinstance(cheaper, bool):  # plain sizes: eager mode
        return small and cheaper
    return statically_known_true(small) and statically_known_true(cheaper)


class CrossModalAttention(nn.Module):
    """Multi-head attention from text tokens (queries) to image features (keys and values).

    Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``D`` = ``embed_dim`` (text
    width), ``E`` = ``image_dim``, ``h`` = ``num_heads``, ``k`` = ``num_kv_heads``,
    ``d`` = ``head_dim``.

    A drop-in, fixed version of the seed notebook's module: same defaults, same positional call,
    same return value and the same parameter names (``text_query``, ``image_key``,
    ``image_value``, ``output_proj``), so a notebook ``state_dict`` loads unchanged.

    Args:
        embed_dim: width ``D`` of the text features, and of the output.
        num_heads: number of query heads ``h``.
        image_dim: width ``E`` of the image features (default ``embed_dim``).
        head_dim: width ``d`` of each head (default ``embed_dim // num_heads``, which must then
            divide evenly). The inner width is ``h·d``.
        num_kv_heads: key/value heads ``k`` (default ``num_heads``): grouped-query attention
            when ``1 < k < h``, multi-query when ``k = 1``. Must divide ``num_heads``.
        qk_norm: apply an RMSNorm over the head width to queries and keys (as Llama 3.2
            Vision's cross-attention does).
        dropout: dropout probability on the attention weights, applied only in training.
        bias: whether the four projections have biases.
        absorb_projections: allow the *absorbed* path (see :meth:`forward`) where it costs less
            arithmetic than projecting keys and values: short text, no weights asked for. It
            gives the same result to rounding; ``False`` always projects keys and values.

    Shapes:
        text_features ``(b, t, D)``, image_features ``(b, i, E)``, output ``(b, t, D)``,
        weights ``(b, h, t, i)``.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        *,
        image_dim: int | None = None,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        qk_norm: bool = False,
        dropout: float = 0.1,
        bias: bool = True,
        absorb_projections: bool = True,
    ) -> None:
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        image_dim = embed_dim if image_dim is None else image_dim
        _check_positive_int("image_dim", image_dim)
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}) "
                    f"when head_dim is not given; pass head_dim= to choose the head width"
                )
            head_dim = embed_dim // num_heads
        _check_positive_int("head_dim", head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        self.embed_dim = embed_dim
        self.image_dim = image_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        if not isinstance(absorb_projections, bool):
            raise TypeError(
                f"absorb_projections must be a bool, got {type(absorb_projections).__name__}"
            )
        self.absorb_projections = absorb_projections

        self.text_query = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.image_key = nn.Linear(image_dim, num_kv_heads * head_dim, bias=bias)
        self.image_value = nn.Linear(image_dim, num_kv_heads * head_dim, bias=bias)
        self.output_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else None
        # (parameters, their addresses, stacked (weight, bias) views or None): see
        # _stacked_kv_projection. Dropped on every conversion, copy and state-dict load; a
        # parameter replaced by hand is let go at the next inference call, which sees the change
        self._kv_stack: _KVStack | None = None
        self._place_kv_side_by_side()

    @property
    def inner_dim(self) -> int:
        """``h·d``: the width of the queries and of the attention output before projection."""
        return self.num_heads * self.head_dim

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, image_dim={self.image_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
        )

    def encode_image(self, image_features: Tensor) -> ImageKV:
        """Project image features to keys and values once, for reuse across decoding steps.

        Args:
            image_features: ``(b, i, E)``.

        Returns:
            an :class:`ImageKV` with key and value ``(b, k, i, d)``.
        """
        _check_features("image_features", image_features, self.image_dim, self.image_key.weight)
        key, value = self._project_kv(image_features)  # (b, k, i, d) views of the projections
        # Stored contiguous, one (i, d) block per head: the copy is made once per image, and
        # every decoding step reads the cache faster for it (one query, one thread, SDPA:
        # 1.82 against 2.56 ms bf16 and 2.62 against 3.84 ms fp32 at i=4096 D1024 h16).
        return ImageKV(key.contiguous(), value.contiguous())

    def _project_kv(
        self,
        image_features: Tensor,
        biases: tuple[Tensor | None, Tensor | None] | None = None,
        *,
        contiguous: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`encode_image`'s keys and values, without its checks (``forward`` made them).

        In inference, with the two weights side by side in memory (see
        :meth:`_place_kv_side_by_side`), keys and values come from one product with the stacked
        ``(2·k·d, E)`` weight, as ``nn.MultiheadAttention``'s packed projection does: one wider
        GEMM runs faster than two (bf16, one thread: 271 against 351 us at the notebook's shape).

        Args:
            image_features: ``(b, i, E)``.
            biases: ``None`` (default) projects with the modules' own biases. Otherwise no key
                bias and ``(None, value_bias)``, ``None`` for no value bias either, where
                :meth:`_kv_biases_after` allows it. On CPU a bias costs ``F.linear`` a copy of
                itself into every output row first: bf16, one thread, 2.5 of 18.0 ms for the
                K/V product at ``i4096 D1024 h16``. Where one stacked product serves and a
                value bias is asked for, the stacked bias brings the key bias along: one
                product beats two, and the softmax cancels the key bias all the same.
            contiguous: return keys and values copied row-major per head, as :func:`attend`
                would copy them for SDPA (:func:`_contiguous_kv_is_faster`). Then the two
                products are made one after the other, each copied out before the next is
                made, so the call holds three of the four tensors at most, not all four
                (peak extra memory, fp32 ``t256 i4096 D1024 h16``: 67 -> 49 MB).

        Returns:
            key and value ``(b, k, i, d)`` (the key normalised where the module has a key norm).
        """
        b, i, _ = image_features.shape
        k, d = self.num_kv_heads, self.head_dim
        stacked = self._stacked_kv_projection(image_features)
        if stacked is not None and (
            contiguous or _fresh_pages_each_call(image_features, 2 * b * i * k * d)
        ):
            # two half-size outputs that the allocator can reuse; where keys and values are
            # copied out anyway, the first output can go before the second is made
            stacked = None
        if stacked is not None:
            weight, bias = stacked
            no_bias = biases is not None and biases[1] is None
            kv = F.linear(image_features, weight, None if no_bias else bias)  # (b, i, 2·k·d)
            kv = kv.view(b, i, 2, k, d).permute(2, 0, 3, 1, 4)
            key, value = kv.unbind(0)  # (b, k, i, d) each, views of one (b, i, 2·k·d) tensor
        else:
            parts = []
            for n, linear in enumerate((self.image_key, self.image_value)):
                if biases is None:  # the module as it is
                    product = linear(image_features)  # (b, i, k·d)
                else:  # a plain nn.Linear without hooks (_kv_biases_after), the bias given
                    product = F.linear(image_features, linear.weight, biases[n])
                part = product.view(b, i, k, d).transpose(1, 2)  # (b, k, i, d)
                if contiguous and not (n == 0 and self.k_norm is not None):
                    part = part.contiguous()
                parts.append(part)
                del product, part  # a copied product is freed before the next one is made
            key, value = parts
        if self.k_norm is not None:
            key = self.k_norm(key)
        if contiguous:  # (no-ops for copies made above)
            key, value = key.contiguous(), value.contiguous()
        return key, value  # (b, k, i, d) each

    def _stacked_kv_projection(self, image_features: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """The key and value projections as one ``(weight, bias)`` of width ``2·k·d``, or ``None``.

        Views, not copies: only where the two weights (and biases) already lie side by side in
        memory, as :meth:`_place_kv_side_by_side` puts them. Only where nothing is lost by it:
        no gradient is needed (a view that spans two parameters would misroute it), not while
        compiling (the compiler fuses on its own), and plain ``nn.Linear`` projections without
        hooks (a hook must see its own module run).
        """
        key, value = self.image_key, self.image_value
        params = (key.weight, value.weight, key.bias, value.bias)
        if torch.is_grad_enabled() and (
            image_features.requires_grad or any(p.requires_grad for p in params if p is not None)
        ):
            return None
        if torch.compiler.is_compiling() or not (_plain_linear(key) and _plain_linear(value)):
            return None
        # The layout check costs ~60 us a call on a cold cache; remember its answer for these
        # very tensors (same objects at the same addresses: a replaced parameter or one whose
        # .data was reassigned is checked afresh)
        where = tuple(0 if p is None else p.data_ptr() for p in params)
        cached = self._kv_stack
        if cached is not None and cached[1] == where and all(map(operator.is_, cached[0], params)):
            return cached[2]
        stacked: tuple[Tensor, Tensor | None] | None = None
        weight = _rows_of_one_tensor(key.weight, value.weight)
        if weight is not None and key.bias is None and value.bias is None:
            stacked = (weight, None)
        elif weight is not None and key.bias is not None and value.bias is not None:
            bias = _rows_of_one_tensor(key.bias, value.bias)
            stacked = None if bias is None else (weight, bias)
        self._kv_stack = (params, where, stacked)
        return stacked

    def _place_kv_side_by_side(self) -> None:
        """Store the key and value projections' weights (and biases) as halves of one tensor.

        Each stays its own parameter, with its own name in the ``state_dict``; only their memory
        is joined, so that inference can project keys and values with one GEMM (see
        :meth:`_project_kv`). Runs at construction and after every conversion of the module
        (``.to()``, ``.bfloat16()``, ``.to_empty()``...), which converts parameters one by one.
        Parameters already side by side, or that are not plain tensors in ordinary memory of
        their own (meta, shared or pinned memory, tensor subclasses such as DTensor, views into
        someone else's flat buffer as FSDP or a fused optimiser make them), are left as they
        are; the projections then simply run one after the other.
        """
        self._kv_stack = None
        for name in ("weight", "bias"):
            first = getattr(self.image_key, name, None)
            second = getattr(self.image_value, name, None)
            if not isinstance(first, nn.Parameter) or not isinstance(second, nn.Parameter):
                continue  # absent, or computed (parametrised, pruned): nothing to place
            if _rows_of_one_tensor(first, second) is not None:
                continue
            plain = all(
                type(p.data) is Tensor
                and p.device.type != "meta"
                and not p.is_shared()
                and not (p.device.type == "cpu" and p.is_pinned())
                and _owns_its_memory(p)
                for p in (first, second)
            )
            if not plain or (first.shape, first.dtype, first.device) != (
                second.shape,
                second.dtype,
                second.device,
            ):
                continue
            joint = torch.cat([first.detach(), second.detach()])
            first.data, second.data = joint[: first.shape[0]], joint[first.shape[0] :]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> CrossModalAttention:
        super()._apply(fn, recurse)  # converts the parameters one by one ...
        self._place_kv_side_by_side()  # ... so join the key and value projections again
        return self

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)  # copy.deepcopy clones each parameter on its own
        self._place_kv_side_by_side()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # load_state_dict(assign=True) replaces parameters: let go of the remembered ones now
        # rather than at the next inference call (copying loads keep the layout as it is)
        self._kv_stack = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(
        self,
        text_features: Tensor,
        image_features: Tensor | None = None,
        attention_mask: Tensor | PreparedMask | None = None,
        *,
        need_weights: bool = True,
        image_kv: ImageKV | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from text to image.

        Args:
            text_features: ``(b, t, D)`` queries.
            image_features: ``(b, i, E)`` keys and values. Leave ``None`` when ``image_kv`` is
                given.
            attention_mask: keep-mask, ``True`` (or non-zero) = this query may attend to this
                image token. ``(b, i)``, ``(b, t, i)`` or ``(b|1, h|1, t, i)``; leading sizes
                may be 1 to broadcast. A query with no visible token gets a zero context (the
                output is then ``output_proj``'s bias) and zero weights. Or a
                :class:`~xmodal.masks.PreparedMask` (:func:`xmodal.prepare_attention_mask`),
                checked and laid out once for every layer and step that reads it.
            need_weights: ``True`` (the notebook's behaviour, the default) takes the explicit
                path and returns the ``(b, h, t, i)`` softmax probabilities, computed in float32
                (float64 for float64 inputs) and returned in the input dtype, before dropout.
                ``False`` runs the fused ``scaled_dot_product_attention`` kernel, never
                materialises the scores, and returns ``None`` weights. Ask for ``False`` unless
                you look at the weights.
            image_kv: keys and values from :meth:`encode_image`, instead of ``image_features``.

        Returns:
            ``(output, weights)``: output ``(b, t, D)``; weights ``(b, h, t, i)`` or ``None``.

        Dropout acts on the attention probabilities in training mode only.
        """
        _check_features("text_features", text_features, self.embed_dim, self.text_query.weight)
        b, t, _ = text_features.shape
        if image_kv is None:
            if image_features is None:
                raise ValueError("pass either image_features or image_kv, got neither")
            _check_features("image_features", image_features, self.image_dim, self.image_key.weight)
            if image_features.shape[0] != b:
                raise ValueError(
                    f"text_features and image_features must have the same batch size, got "
                    f"shapes {tuple(text_features.shape)} and {tuple(image_features.shape)}"
                )
            image_len = image_features.shape[1]
        elif image_features is not None:
            raise ValueError("pass either image_features or image_kv, not both")
        else:
            self._check_image_kv(image_kv, b, text_features)
            image_len = image_kv.image_len

        q = self.text_query(text_features).view(b, t, self.num_heads, self.head_dim)  # (b, t, h, d)
        if self.q_norm is not None:
            q = self.q_norm(q)
        # (b|1, h|1, t|1, i) bool, or a PreparedMask checked for these sizes
        mask = mask_for_call(attention_mask, b, self.num_heads, t, image_len, text_features.device)
        dropout_p = self.dropout.p if self.training else 0.0
        if image_features is not None and self._absorbs(image_features, t, need_weights):
            context = self._attend_absorbed(q, image_features, mask, dropout_p)  # (b, t, h, d)
            weights = None
        else:
            if image_kv is None:
                assert image_features is not None  # checked above
                key, value, value_bias = self._keys_and_values(image_features, t, dropout_p)
            else:
                key, value, value_bias = image_kv.key, image_kv.value, None  # (b, k, i, d)
            context, weights = attend(
                q.transpose(1, 2),
                key,
                value,
                mask,
                dropout_p=dropout_p,
                need_weights=need_weights,
                value_bias=value_bias,
            )  # (b, h, t, d), (b, h, t, i) | None
            context = context.transpose(1, 2)  # (b, t, h, d)
        return self.output_proj(context.reshape(b, t, self.inner_dim)), weights

    def which_path(
        self,
        text_features: Tensor,
        image_features: Tensor | None = None,
        *,
        need_weights: bool = True,
        image_kv: ImageKV | None = None,
    ) -> str:
        """Which computation :meth:`forward` would run on these inputs, without running it.

        Returns:
            ``"explicit"`` (``need_weights=True``: scores, float32 softmax, weights returned),
            ``"absorbed"`` (short text: no keys or values computed; see
            :meth:`_attend_absorbed`), ``"math"`` (bf16 training on CPU: matmul, softmax,
            matmul, faster there than SDPA's backward) or ``"sdpa"``
            (``scaled_dot_product_attention``).
        """
        if need_weights:
            return "explicit"
        t = text_features.shape[1]
        if image_kv is None:
            if image_features is None:
                raise ValueError("pass either image_features or image_kv, got neither")
            if self._absorbs(image_features, t, need_weights):
                return "absorbed"
            image_len, kv_grad = image_features.shape[1], image_features.requires_grad
        else:
            image_len, kv_grad = image_kv.image_len, image_kv.key.requires_grad
        grad = torch.is_grad_enabled() and (
            text_features.requires_grad
            or kv_grad
            or any(p.requires_grad for p in self.parameters())
        )
        num_scores = text_features.shape[0] * self.num_heads * t * image_len
        if _math_is_faster(text_features, grad, num_scores):
            return "math"
        return "sdpa"

    def _absorbs(self, image_features: Tensor, text_len: int, need_weights: bool) -> bool:
        """Whether :meth:`forward` takes the absorbed path (see :func:`absorbed_is_cheaper`).

        Only where it is exact and measured: no weights asked for, image features rather than
        a cache, no key norm (it acts on projected keys), plain ``nn.Linear`` key and value
        projections without hooks (a LoRA, quantised or hooked projection must run as itself),
        float32/bfloat16/float64 on CPU outside autocast.
        """
        if need_weights or not self.absorb_projections or self.k_norm is not None:
            return False
        x = image_features
        cheaper = absorbed_is_cheaper(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            image_dim=self.image_dim,
            text_len=text_len,
            image_len=x.shape[1],
            dtype=x.dtype,
        )
        return (
            cheaper
            and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and _plain_linear(self.image_key)
            and _plain_linear(self.image_value)
        )

    def _keys_and_values(
        self, image_features: Tensor, text_len: int, dropout_p: float
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The projected path's keys and values ``(b, k, i, d)``, and a bias for the context.

        The key bias is left out and the value bias goes to the context (:func:`attend`'s
        ``value_bias``) where :meth:`_kv_biases_after` allows. Otherwise the modules project
        as they are.
        """
        key_moved, value_moved = self._kv_biases_after(dropout_p, image_features.shape[1], text_len)
        query_rows = text_len * (self.num_heads // self.num_kv_heads)  # per K/V head, as attend
        contiguous = _contiguous_kv_is_faster(image_features, query_rows, torch.is_grad_enabled())
        if not key_moved:
            return (*self._project_kv(image_features, contiguous=contiguous), None)
        value_bias = self._value_bias()  # the key bias's zero gradient attached
        biases = (None, None) if value_moved else (None, value_bias)
        key, value = self._project_kv(image_features, biases, contiguous=contiguous)
        return key, value, value_bias if value_moved else None

    def _kv_biases_after(
        self, dropout_p: float, image_len: int, text_len: int
    ) -> tuple[bool, bool]:
        """Which K/V biases the projected path moves out of the K/V products: ``(key, value)``.

        Both moves are exact for any input. The softmax cancels ``q·b_k``, the same for every
        image token of a row, so the key bias is left out. A visible row's probabilities sum to
        1, so ``b_v`` can be added to the ``h·t`` context rows (:func:`attend`'s
        ``value_bias``) instead of the ``k·i`` value rows: it is, where those are more (a bias
        costs about the same per element on either side, a little more on the context in
        bf16), and not with dropout, whose kept probabilities do not sum to 1. Neither move
        with a key norm (it acts on the biased keys), under autocast (the bias would be added
        in another dtype), or for projections other than plain ``nn.Linear`` without hooks,
        which must run as themselves; and only where both biases exist, as the key bias's zero
        gradient rides on the value bias (:meth:`_value_bias`).
        """
        key, value = self.image_key, self.image_value
        if (
            self.k_norm is not None
            or not (_plain_linear(key) and _plain_linear(value))
            or torch.is_autocast_enabled(key.weight.device.type)
        ):
            return False, False
        if key.bias is None or value.bias is None:
            return False, False
        fewer_rows = self.num_heads * text_len < self.num_kv_heads * image_len
        if not isinstance(fewer_rows, bool):  # symbolic sizes (export): keep it where it is
            fewer_rows = statically_known_true(fewer_rows)
        return True, dropout_p == 0 and fewer_rows

    def _value_bias(self) -> Tensor | None:
        """``image_value``'s bias ``(k·d,)`` for paths that leave the key bias out, or ``None``.

        They add it after attention, or in the value product alone. The key bias's gradient is
        then exactly zero (the softmax cancels it); in training it rides on the value bias as
        ``0 * sum(b_k)``, so that autograd gives it that zero rather than no gradient at all
        (DDP expects a gradient for every parameter used).
        """
        bias: Tensor | None = self.image_value.bias
        key_bias = self.image_key.bias
        if key_bias is not None and torch.is_grad_enabled() and key_bias.requires_grad:
            anchor = 0.0 * key_bias.sum()
            width = self.num_kv_heads * self.head_dim
            bias = anchor.expand(width) if bias is None else bias + anchor
        return bias

    def _attend_absorbed(
        self,
        q: Tensor,
        image_features: Tensor,
        mask: Tensor | PreparedMask | None,
        dropout_p: float,
    ) -> Tensor:
        """Attention with the key and value projections folded into the query and output side.

        For one head, ``softmax(q·(W_k x + b_k)) · (W_v x + b_v)`` equals
        ``softmax((q W_k)·x) · x  W_v^T + b_v``: ``q·b_k`` is the same for every image token of
        a row, so the softmax cancels it, and the probabilities of a row sum to 1, so ``b_v``
        comes out whole. Each head therefore attends to the raw image features with the query
        ``q̃ = q W_k`` (width ``E``), and ``W_v`` is applied once to the mixed features ``x̄``.
        No keys or values are computed; a row that sees no image token gets a zero context.

        Written as few kernels as it can be: at small sizes each extra pass over a tensor costs
        as much as the arithmetic. The rows of each batch element are ordered ``(t, h)``, the
        projection's own order, so the queries are read in place, the mixed features go to the
        ``W_v`` product as a strided view, and only ``q̃`` is copied once into its batch rows;
        the scale rides on the ``q W_k`` product, a key-padding mask's bias on the scores
        product, and rows that see nothing are zeroed once, on the narrow context (value bias
        included).

        Args:
            q: ``(b, t, h, d)`` queries (after the optional query norm), contiguous.
            image_features: ``(b, i, E)``.
            mask: normalised keep-mask ``(b|1, h|1, t|1, i)``, a prepared one, or ``None``.

        Returns:
            context ``(b, t, h, d)``, as :func:`attend` gives it after the projections.
        """
        b, t, h, d = q.shape
        k, e, i = self.num_kv_heads, self.image_dim, image_features.shape[1]
        g = h // k  # query heads per key/value head: head κ·g + j reads W_k of head κ
        w_k = self.image_key.weight.view(k, d, e)
        w_v = self.image_value.weight.view(k, d, e)

        # (k, b·t·g, d), rows (b, t, j): a view of q when g == 1 or k == 1
        q = q.view(b * t, k, g, d).transpose(0, 1).reshape(k, b * t * g, d)
        zero = q.new_zeros(())
        q_image = torch.baddbmm(zero, q, w_k, beta=0, alpha=d**-0.5)  # (k, b·t·g, E): q W_k / √d
        q_image = q_image.view(k, b * t, g, e).transpose(0, 1).reshape(b, t * h, e)  # rows (t, h)

        x_t = image_features.transpose(1, 2)  # (b, E, i)
        prepared: PreparedMask | None = None
        if isinstance(mask, PreparedMask):
            prepared, mask = mask, mask.keep
        if mask is not None and mask.shape[1] == 1 and mask.shape[2] == 1:
            # a key-padding mask (b|1, 1, 1, i): its bias rides on the product, no extra pass
            if (
                prepared is not None
                and not prepared.empty_rows  # (-inf rows would be NaN: the guard needs finite)
                and prepared.additive.dtype == q_image.dtype
            ):
                bias = prepared.additive.view(mask.shape[0], 1, i)
            else:
                bias = _mask_bias(mask, q_image.dtype).view(mask.shape[0], 1, i)
            probs = torch.softmax(torch.baddbmm(bias, q_image, x_t), dim=-1)  # (b, t·h, i)
        else:
            scores = torch.bmm(q_image, x_t).view(b, t, h, i)
            mask_th = None if mask is None else mask.transpose(1, 2)  # (b|1, t|1, h|1, i)
            probs = _probabilities(scores, mask_th)  # rows that see nothing: finite, zeroed below
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        mixed = torch.bmm(probs.view(b, t * h, i), image_features)  # (b, t·h, E): sum_i p_i x_i
        mixed = mixed.view(b * t, k, g, e).transpose(0, 1).reshape(k, b * t * g, e)  # rows (b,t,j)

        value_bias = self._value_bias()  # (k·d,) | None, the key bias's zero gradient attached
        w_v_t = w_v.transpose(1, 2)  # (k, E, d)
        if value_bias is None:
            context = torch.bmm(mixed, w_v_t)  # (k, b·t·g, d)
        else:
            bias = value_bias.view(k, 1, d)
            if dropout_p > 0:  # each value carries b_v: the row gets it times its kept mass
                kept = probs.view(b * t, k, g, i).sum(-1).transpose(0, 1)  # (k, b·t, g)
                bias = kept.reshape(k, b * t * g, 1) * bias  # (k, b·t·g, d)
            context = torch.baddbmm(bias, mixed, w_v_t)
        context = context.view(k, b * t, g, d).transpose(0, 1).reshape(b, t, h, d)
        if mask is not None:  # a row that sees nothing: zero context, value bias included
            if prepared is not None:
                visible = prepared.visible if prepared.empty_rows else None
            else:
                visible = _any_last(mask)
                visible = None if _no_empty_rows(visible) else visible
            if visible is not None:
                context = context * visible.transpose(1, 2)  # (b|1, t|1, h|1, 1)
        return context

    def _check_image_kv(self, kv: ImageKV, batch_size: int, text: Tensor) -> None:
        if not isinstance(kv, ImageKV):
            raise TypeError(f"image_kv must be an ImageKV, got {type(kv).__name__}")
        expected = (batch_size, self.num_kv_heads, kv.image_len, self.head_dim)
        if tuple(kv.key.shape) != expected:
            raise ValueError(
                f"image_kv.key has shape {tuple(kv.key.shape)}, expected (b, k, i, d) = "
                f"{expected} for text_features of batch size {batch_size}"
            )
        for part in (kv.key, kv.value):
            if part.device != text.device:
                raise ValueError(
                    f"image_kv is on {part.device}, but text_features is on {text.device}"
                )
            if part.dtype != text.dtype and not torch.is_autocast_enabled(text.device.type):
                raise TypeError(
                    f"image_kv has dtype {part.dtype}, but text_features has dtype "
                    f"{text.dtype}; encode the image with the same module and dtype"
                )


# CrossModalAttention._stacked_kv_projection's memo: the four key/value parameters, their data
# addresses, and the stacked (weight, bias) views they allow, or None
_KVStack = tuple[tuple[Tensor | None, ...], tuple[int, ...], tuple[Tensor, Tensor | None] | None]


def _rows_of_one_tensor(first: Tensor, second: Tensor) -> Tensor | None:
    """``torch.cat([first, second])`` as a view, if the two already lie so in memory; else ``None``.

    Both contiguous, of one shape and dtype, ``second`` starting where ``first`` ends, in one
    storage. Tensors without data (meta, fake) give ``None``.
    """
    try:
        if not (
            first.shape == second.shape
            and first.dtype == second.dtype
            and first.is_contiguous()
            and second.is_contiguous()
            and first.data_ptr() != 0
            and second.data_ptr() == first.data_ptr() + first.nbytes
        ):
            return None
        return first.detach().as_strided((2 * first.shape[0], *first.shape[1:]), first.stride())
    except (RuntimeError, NotImplementedError):  # no data, or adjacent by chance in two storages
        return None


# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB): it never
# keeps freed blocks this large on its heap, whatever mallopt or its dynamic threshold says
MALLOC_MMAP_THRESHOLD_MAX = 32 << 20


def _fresh_pages_each_call(x: Tensor, numel: int) -> bool:
    """Whether a CPU tensor of ``numel`` elements of ``x``'s dtype may cost fresh memory on every
    call, where two of half its size would not.

    glibc serves an allocation of :data:`MALLOC_MMAP_THRESHOLD_MAX` bytes or more that no free
    block of its heap can hold with a new ``mmap``, which the kernel faults in and zeroes page
    by page on first touch and which ``free`` unmaps: every call pays again, or not, by the luck
    of what the process allocated before. One thread, fp32, the stacked K/V product at
    ``i4096 D1024 h16`` (exactly 32 MiB), three fresh processes
    (``benchmarks/bench_kv_layout.py``): 117-141 ms a call with 8193 page faults, against
    110-119 ms and none for two products with 16 MiB outputs. Other allocators (jemalloc,
    tcmalloc) reuse large blocks; where no faults happened the module timed the same either
    way (0.99-1.01x, interleaved), so the split costs little there.
    """
    size = numel * x.element_size()
    return x.device.type == "cpu" and size >= MALLOC_MMAP_THRESHOLD_MAX > size // 2


def _owns_its_memory(p: Tensor) -> bool:
    """``p`` is the whole of its storage, not a view into a larger buffer someone else keeps."""
    try:
        return p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.nbytes
    except (RuntimeError, NotImplementedError):  # no storage to look at
        return False


def _plain_linear(m: nn.Module) -> bool:
    """``m`` is exactly ``nn.Linear`` and no forward hook would see it run."""
    module_hooks = nn.modules.module
    return (
        type(m) is nn.Linear
        and not m._forward_hooks
        and not m._forward_pre_hooks
        and not module_hooks._global_forward_hooks
        and not module_hooks._global_forward_pre_hooks
    )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _check_features(name: str, x: object, width: int, weight: Tensor) -> None:
    """Check a ``(b, n, width)`` feature tensor against the projection that will read it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{name} must have shape (b, n, {width}), got rank {x.dim()} shape {tuple(x.shape)}"
        )
    if x.shape[-1] != width:
        raise ValueError(
            f"{name} must have shape (b, n, {width}), got last dimension {x.shape[-1]} "
            f"(shape {tuple(x.shape)})"
        )
    _check_device_dtype(name, x, weight)


def _check_device_dtype(name: str, x: Tensor, weight: Tensor) -> None:
    """``x`` must be on ``weight``'s device and of its dtype (any dtype under autocast)."""
    if x.device != weight.device:
        raise ValueError(
            f"{name} is on {x.device}, but the module's weights are on {weight.device}"
        )
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} has dtype {x.dtype}, but the module's weights are {weight.dtype}; "
            f"convert one of them (module.to({x.dtype}) or {name}.to({weight.dtype})), "
            f"or run under torch.autocast"
        )
