"""Attention-mask normalisation.

Legend: ``b`` batch, ``t`` text tokens (queries), ``i`` image tokens (keys), ``h`` heads.

xmodal masks are **keep-masks**: ``True`` -- or any non-zero number, as in the seed notebook's
``mask == 0`` convention -- means *this query may attend to this image token*. Note that this is
the opposite of ``nn.MultiheadAttention``'s boolean ``key_padding_mask`` (``True`` = ignore) and
that an *additive* float mask (``0`` / ``-inf``) is **not** understood: its zeros would read as
"masked". Convert those first (``mask == 0`` for an additive mask).

Accepted shapes (any of the leading ``b``, ``h`` and ``t`` may be ``1`` to broadcast):

========  =====================  ==========================================
rank      shape                  meaning
========  =====================  ==========================================
2         ``(b|1, i)``           key padding: the same for every query
3         ``(b, t, i)``          per query
4         ``(b|1, h|1, t|1, i)`` per head and query
========  =====================  ==========================================

Every mask is turned into a boolean tensor of rank 4 that broadcasts against ``(b, h, t, i)``
scores. That is the form ``scaled_dot_product_attention`` takes without copying it per head.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalize_attention_mask"]


def _fmt(shape: tuple[int, ...] | torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def normalize_attention_mask(
    mask: Tensor | None,
    *,
    batch_size: int,
    num_heads: int,
    text_len: int,
    image_len: int,
    device: torch.device | None = None,
    name: str = "attention_mask",
) -> Tensor | None:
    """Validate a keep-mask and return it as a broadcastable boolean ``(b|1, h|1, t|1, i)``.

    Args:
        mask: ``None`` or a tensor of rank 2, 3 or 4 (see the module docstring). Boolean or any
            real numeric dtype; non-zero means "may attend".
        batch_size, num_heads, text_len, image_len: the sizes of the scores it must fit.
        device: if given, the device the mask must be on.
        name: the argument name used in error messages.

    Returns:
        ``None`` if ``mask`` is ``None``, else a ``torch.bool`` tensor of rank 4 whose sizes are
        each either ``1`` or the matching full size. No per-head copy is made; a numeric mask is
        compared with zero once, at its own size.

    Raises:
        TypeError: ``mask`` is not a tensor, or is complex.
        ValueError: the rank or a size does not fit, or the mask is on another device.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be boolean or real-valued, got dtype {mask.dtype}")

    if device is not None and mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, but the features are on {device}")
    full = (batch_size, num_heads, text_len, image_len)
    if mask.dim() == 2:
        expected = "(b|1, i)"
        allowed = ((batch_size, 1), (image_len,))
        view = mask[:, None, None, :]  # (b, 1, 1, i)
    elif mask.dim() == 3:
        expected = "(b|1, t|1, i)"
        allowed = ((batch_size, 1), (text_len, 1), (image_len,))
        view = mask[:, None, :, :]  # (b, 1, t, i)
    elif mask.dim() == 4:
        expected = "(b|1, h|1, t|1, i)"
        allowed = ((batch_size, 1), (num_heads, 1), (text_len, 1), (image_len,))
        view = mask
    else:
        raise ValueError(
            f"{name} must have rank 2 (b, i), 3 (b, t, i) or 4 (b, h, t, i); got rank "
            f"{mask.dim()} with shape {_fmt(mask.shape)} for scores of shape "
            f"(b, h, t, i) = {_fmt(full)}"
        )
    if any(size not in ok for size, ok in zip(mask.shape, allowed, strict=True)):
        raise ValueError(
            f"{name} has shape {_fmt(mask.shape)}, expected {expected} with b={batch_size}, "
            f"h={num_heads}, t={text_len}, i={image_len} (a size of 1 broadcasts, except i)"
        )
    if view.dtype != torch.bool:
        view = view != 0
    return view
