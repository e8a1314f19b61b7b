"""Block-sparse media attention with ``torch.nn.attention.flex_attention``.

Legend: ``b`` batch, ``t`` text tokens (queries), ``i`` image tokens (keys), ``m`` media,
``n`` tokens per medium (``i = m·n``), ``h`` query heads, ``k`` key/value heads, ``d`` head
width.

In an interleaved document most of a media mask is empty: with the ``immediate`` policy a text
token sees the ``n`` tokens of one image out of ``m·n``. Dense masked SDPA still computes every
``(text, image)`` score and throws most away. A flex-attention :class:`BlockMask` records which
``(text block, image block)`` tiles hold any visible pair; the compiled kernel skips the empty
tiles and evaluates the mask only on the partial ones.

Two ways to get a block mask, and one attention call that uses it:

* :func:`media_block_mask` -- from where the images are (``media_locations`` and a policy, as
  :func:`xmodal.media_attention_mask` takes them), without building the dense mask;
* :func:`block_mask_from_keep_mask` -- from any dense keep-mask ``(b|1, t, i)`` or
  ``(b|1, h|1, t, i)``;
* :func:`flex_attend` -- the attention core on ``(b, h, t, d)`` queries and ``(b, k, i, d)``
  keys/values (GQA included), and :func:`sparse_cross_attention`, which runs a
  :class:`xmodal.CrossModalAttention`'s projections around it.

Semantics are xmodal's: keep-masks (``True`` = may attend), and a text token that sees no
image token gets a zero context vector. Measured on CPU against dense masked SDPA in
``docs/generation.md`` (``benchmarks/bench_flex.py``). Outside ``torch.compile`` the kernel is
compiled on first use for each shape (seconds); eager flex is a slow reference implementation,
``compiled=False`` runs it (for tests).

Inference path: there is no attention dropout here, ``need_weights`` has no equivalent, and on
CPU flex attention has no backward (call it under ``torch.no_grad()`` or
``torch.inference_mode()``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from xmodal.attention import CrossModalAttention, ImageKV
from xmodal.masks import MediaPolicy, visible_media_range

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    FLEX_AVAILABLE = True
except ImportError:  # pragma: no cover - torch < 2.5
    FLEX_AVAILABLE = False
    BlockMask = Any  # type: ignore[misc,assignment]

__all__ = [
    "FLEX_AVAILABLE",
    "block_mask_from_keep_mask",
    "flex_attend",
    "media_block_mask",
    "sparse_cross_attention",
]

CPU_BLOCK_SIZE = 64
"""Default tile size on CPU. 64 beat flex's default 128 on CPU for 64-token media (more tiles
are entirely empty; docs/generation.md). On CUDA the kernel's own tiles need multiples of
128, flex's default, which is what ``block_size=None`` gives there."""


def _default_block_size(block_size: int | None, device: torch.device) -> int:
    if block_size is None:
        return CPU_BLOCK_SIZE if device.type == "cpu" else 128
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    return block_size


def _require_flex() -> None:
    if not FLEX_AVAILABLE:  # pragma: no cover - torch < 2.5
        raise RuntimeError(
            f"block-sparse attention needs torch.nn.attention.flex_attention (torch >= 2.5), "
            f"this is torch {torch.__version__}"
        )


def block_mask_from_keep_mask(mask: Tensor, *, block_size: int | None = None) -> BlockMask:
    """A flex-attention block mask from a dense keep-mask.

    Args:
        mask: ``(b|1, t, i)`` or ``(b|1, h|1, t, i)``, boolean or numeric (non-zero = may
            attend), e.g. from :func:`xmodal.media_attention_mask`. A size-1 batch or head axis
            broadcasts.
        block_size: tile size in both directions (text and image tokens); default 64 on CPU,
            128 (flex's default, required by its CUDA kernel) elsewhere.

    Returns:
        a ``BlockMask`` of shape ``(b|1, h|1, t, i)``. Tiles with no ``True`` are skipped by
        :func:`flex_attend`; tiles with only ``True`` are run without evaluating the mask.

    Raises:
        TypeError: ``mask`` is not a real tensor.
        ValueError: ``mask`` has another rank, or ``block_size`` is not a positive int.
    """
    _require_flex()
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"mask must be boolean or real-valued, got dtype {mask.dtype}")
    if mask.dim() == 3:
        keep = mask[:, None]  # (b|1, 1, t, i)
    elif mask.dim() == 4:
        keep = mask
    else:
        raise ValueError(
            f"mask must have shape (b|1, t, i) or (b|1, h|1, t, i), got rank {mask.dim()} "
            f"shape {tuple(mask.shape)}"
        )
    block_size = _default_block_size(block_size, keep.device)
    keep = keep if keep.dtype == torch.bool else keep != 0
    nb, nh, t, i = keep.shape

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return keep[b if nb > 1 else 0, h if nh > 1 else 0, q, kv]

    return _create(mask_mod, nb, nh, t, i, keep.device, block_size)


def media_block_mask(
    media_locations: Tensor,
    tokens_per_media: int,
    *,
    num_media: int | None = None,
    policy: MediaPolicy = "immediate",
    block_size: int | None = None,
) -> BlockMask:
    """The block mask of :func:`xmodal.media_attention_mask`, without the dense mask.

    Text token ``q`` may see image column ``c`` iff ``first[q] <= c // n < end[q]``, with the
    ranges from :func:`xmodal.visible_media_range`; only those two ``(b, t)`` vectors are read.

    Args:
        media_locations: ``(b, t)`` bool (or 0/1 integers), True at each image's marker token.
        tokens_per_media: ``n``, the tokens of each medium.
        num_media: ``m``, the media slots of the ``(b, m, n, E)`` media tensor (default: the
            most markers in any row).
        policy: ``"immediate"``, ``"all_previous"`` or ``"grouped"`` (see
            :func:`xmodal.media_attention_mask`).
        block_size: tile size in both directions (default as in
            :func:`block_mask_from_keep_mask`).

    Returns:
        a ``BlockMask`` of shape ``(b, 1, t, m·n)``.
    """
    _require_flex()
    if isinstance(tokens_per_media, bool) or not isinstance(tokens_per_media, int):
        raise TypeError(
            f"tokens_per_media must be an int, got {type(tokens_per_media).__name__} "
            f"{tokens_per_media!r}"
        )
    if tokens_per_media <= 0:
        raise ValueError(f"tokens_per_media must be positive, got {tokens_per_media}")
    first, end = visible_media_range(media_locations, policy=policy)  # (b, t) each
    most = int(end[:, -1].max()) if end.numel() else 0
    if num_media is None:
        num_media = most
    elif isinstance(num_media, bool) or not isinstance(num_media, int) or num_media < 0:
        raise ValueError(f"num_media must be a non-negative int or None, got {num_media!r}")
    elif most > num_media:
        raise ValueError(
            f"media_locations has a row with {most} image markers, but num_media is "
            f"{num_media}; pass num_media >= {most} (media slots in the media tensor)"
        )
    n = tokens_per_media
    b, t = first.shape
    block_size = _default_block_size(block_size, first.device)

    def mask_mod(bi: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        medium = kv // n
        return (medium >= first[bi, q]) & (medium < end[bi, q])

    return _create(mask_mod, b, 1, t, num_media * n, first.device, block_size)


def _create(
    mask_mod: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
    b: int,
    h: int,
    t: int,
    i: int,
    device: torch.device,
    block_size: int,
) -> BlockMask:
    return create_block_mask(
        mask_mod,
        b if b > 1 else None,
        h if h > 1 else None,
        t,
        i,
        device=device,
        BLOCK_SIZE=block_size,
    )


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    # One compiled wrapper for the process; dynamo recompiles it per shape and block size.
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    compiled: bool = True,
) -> Tensor:
    """Block-sparse attention: :func:`xmodal.attend`'s fused path, with a block mask.

    Args:
        q: queries ``(b, h, t, d)``.
        k, v: keys and values ``(b, k, i, d)``; ``h`` a multiple of ``k`` (GQA/MQA are served
            by flex's ``enable_gqa``, without copying keys or values).
        block_mask: from :func:`media_block_mask` or :func:`block_mask_from_keep_mask`, of
            shape ``(b|1, h|1, t, i)``.
        compiled: run the compiled kernel (default; inside ``torch.compile`` the surrounding
            graph compiles it). ``False`` runs eager flex, a slow reference that materialises
            the scores -- for tests.

    Returns:
        context ``(b, h, t, d)`` in ``q``'s dtype; a query that sees no image token gets zeros.
    """
    _require_flex()
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask must be a flex-attention BlockMask, got {type(block_mask).__name__}"
        )
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"q must be (b, h, t, d) and k, v (b, k, i, d), got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    b, h, t, _ = q.shape
    i = k.shape[2]
    mb, mh, mt, mi = block_mask.shape
    if mt != t or mi != i or mb not in (1, b) or mh not in (1, h):
        raise ValueError(
            f"block_mask has shape {(mb, mh, mt, mi)}, expected (b|1, h|1, t, i) with b={b}, "
            f"h={h}, t={t}, i={i}"
        )
    if h % k.shape[1]:
        raise ValueError(f"q has {h} heads, not a multiple of the {k.shape[1]} key/value heads")
    if (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(x.requires_grad for x in (q, k, v))
    ):
        raise RuntimeError(
            "flex_attention has no backward on CPU: run the block-sparse path under "
            "torch.no_grad() or torch.inference_mode(), or use the dense path for training"
        )
    gqa = h != k.shape[1]
    if i == 0:  # nothing to see (a static-shape branch)
        return q.new_zeros(q.shape)
    if torch.compiler.is_compiling():
        # Inside a larger graph, inductor's CPU flex template fails to lower a query that is a
        # view of a matmul output (torch 2.13: "not enough values to unpack"); give it
        # contiguous (b, h, t, d) buffers.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    elif compiled:
        out = _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    else:
        with warnings.catch_warnings():  # "flex_attention called without torch.compile()"
            warnings.simplefilter("ignore", UserWarning)
            out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return out  # (b, h, t, d)


def sparse_cross_attention(
    attn: CrossModalAttention,
    text_features: Tensor,
    block_mask: BlockMask,
    *,
    image_features: Tensor | None = None,
    image_kv: ImageKV | None = None,
    compiled: bool = True,
) -> Tensor:
    """``attn(text_features, image_features, mask, need_weights=False)[0]``, block-sparse.

    Runs ``attn``'s projections (and q/k-norm) around :func:`flex_attend`. The output equals
    the dense path with the mask the block mask was made from, to float tolerance.

    Args:
        attn: the :class:`xmodal.CrossModalAttention` whose weights to use (in eval mode, or
            with ``dropout=0``: this path has no attention dropout).
        text_features: ``(b, t, D)``.
        block_mask: ``(b|1, h|1, t, i)`` block mask.
        image_features: ``(b, i, E)``, or ``None`` when ``image_kv`` is given.
        image_kv: keys/values from ``attn.encode_image``.
        compiled: see :func:`flex_attend`.

    Returns:
        ``(b, t, D)``.
    """
    if not isinstance(attn, CrossModalAttention):
        raise TypeError(f"attn must be a CrossModalAttention, got {type(attn).__name__}")
    if attn.training and attn.dropout.p > 0:
        raise ValueError(
            f"sparse_cross_attention has no attention dropout, but attn is in training mode "
            f"with dropout={attn.dropout.p}; call attn.eval() or build it with dropout=0.0"
        )
    if (image_features is None) == (image_kv is None):
        raise ValueError("pass exactly one of image_features and image_kv")
    if not isinstance(text_features, Tensor) or text_features.dim() != 3:
        raise ValueError(
            f"text_features must be a tensor of shape (b, t, {attn.embed_dim}), got "
            f"{getattr(text_features, 'shape', type(text_features).__name__)}"
        )
    kv = attn.encode_image(image_features) if image_kv is None else image_kv  # type: ignore[arg-type]
    b, t, _ = text_features.shape
    attn._check_image_kv(kv, b, text_features)  # the same errors as attn(..., image_kv=)
    q = attn.text_query(text_features).view(b, t, attn.num_heads, attn.head_dim)
    q = q.transpose(1, 2)  # (b, h, t, d)
    if attn.q_norm is not None:
        q = attn.q_norm(q)
    context = flex_attend(q, kv.key, kv.value, block_mask, compiled=compiled)  # (b, h, t, d)
    context = context.transpose(1, 2).reshape(b, t, attn.inner_dim)  # (b, t, h·d)
    return attn.output_proj(context)
