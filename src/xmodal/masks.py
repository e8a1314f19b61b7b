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

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MEDIA_POLICIES",
    "MediaPolicy",
    "PreparedMask",
    "media_attention_mask",
    "media_locations_from_ids",
    "normalize_attention_mask",
    "prepare_attention_mask",
    "visible_media_range",
]


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
    allowed: tuple[tuple[int, ...], ...]
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


def any_last(mask: Tensor) -> Tensor:
    """``mask.any(dim=-1, keepdim=True)`` for a boolean mask, as a byte-wise maximum.

    The same values; ``any`` over the last axis of a boolean CPU tensor is slow (one thread,
    torch 2.13: 1252 us against 16 us for a ``(1, 1, 1024, 512)`` mask, 273 against 39 us for
    ``(4, 8, 20, 196)``).
    """
    return mask.view(torch.uint8).amax(dim=-1, keepdim=True).view(torch.bool)


@dataclass(frozen=True, eq=False)
class PreparedMask:
    """A keep-mask checked and laid out once, for every layer and decoding step that reads it.

    Build it with :func:`prepare_attention_mask` and pass it as ``attention_mask`` to
    :class:`~xmodal.CrossModalAttention` or :class:`~xmodal.GatedCrossAttentionBlock` in place
    of the raw mask. Each call then skips what a raw mask costs it -- validation and broadcasting
    (:func:`normalize_attention_mask`), the search for rows that see nothing, and SDPA's
    conversion of a boolean mask into an additive one: 56-156 us a layer on CPU at the seed
    notebook's shape (one thread; the mask then costs 28-68 instead of 89-224 us). A Flamingo
    model reads one mask in every cross-attention layer, as Hugging Face models build their
    additive 4-D mask once per forward pass.

    Attributes:
        keep: ``(b|1, h|1, t|1, i)`` bool, ``True`` = may attend (as
            :func:`normalize_attention_mask` returns it).
        visible: ``(b|1, h|1, t|1, 1)`` bool: rows that see at least one image token.
        empty_rows: whether some row sees no image token at all.
        additive: ``keep`` as SDPA's additive mask, ``0`` where kept and ``-inf`` where not, in
            the dtype it was prepared for (calls in another dtype use ``keep``).
    """

    keep: Tensor
    visible: Tensor
    empty_rows: bool
    additive: Tensor

    def check(
        self,
        *,
        batch_size: int,
        num_heads: int,
        text_len: int,
        image_len: int,
        device: torch.device,
        name: str = "attention_mask",
    ) -> None:
        """Raise ``ValueError`` unless this mask fits scores ``(b, h, t, i)`` on ``device``."""
        full = (batch_size, num_heads, text_len, image_len)
        shape = tuple(self.keep.shape)
        fits = (
            n == m or (n == 1 and j < 3) for j, (n, m) in enumerate(zip(shape, full, strict=True))
        )
        if not all(fits):
            raise ValueError(
                f"{name} was prepared as {_fmt(shape)}, which does not fit scores of shape "
                f"(b, h, t, i) = {_fmt(full)}; prepare it for these sizes"
            )
        if self.keep.device != device:
            raise ValueError(f"{name} is on {self.keep.device}, but the features are on {device}")


def mask_for_call(
    mask: Tensor | PreparedMask | None,
    batch_size: int,
    num_heads: int,
    text_len: int,
    image_len: int,
    device: torch.device | None,
) -> Tensor | PreparedMask | None:
    """A raw keep-mask normalised (``(b|1, h|1, t|1, i)`` bool), or a prepared one checked.

    What every layer does with the ``attention_mask`` it is given.
    """
    if isinstance(mask, PreparedMask):
        if device is None:
            device = mask.keep.device
        mask.check(
            batch_size=batch_size,
            num_heads=num_heads,
            text_len=text_len,
            image_len=image_len,
            device=device,
        )
        return mask
    return normalize_attention_mask(
        mask,
        batch_size=batch_size,
        num_heads=num_heads,
        text_len=text_len,
        image_len=image_len,
        device=device,
    )


def prepare_attention_mask(
    mask: Tensor | PreparedMask | None,
    *,
    batch_size: int,
    num_heads: int,
    text_len: int,
    image_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> PreparedMask | None:
    """Check a keep-mask once and lay it out for every call that will read it.

    Args:
        mask: ``None``, a keep-mask as :func:`normalize_attention_mask` takes it, or a
            :class:`PreparedMask` (checked against these sizes and returned as it is).
        batch_size, num_heads, text_len, image_len: the sizes of the scores it must fit. A mask
            without a head axis fits any number of heads: pass any (``1``).
        dtype: the dtype of the queries that will read it (the additive form's dtype).
        device: if given, the device the mask must be on.

    Returns:
        ``None`` if ``mask`` is ``None``, else a :class:`PreparedMask`. Finding rows that see
        nothing reads the mask's values: on a GPU that is one host sync, here, once.

    Raises:
        TypeError, ValueError: as :func:`normalize_attention_mask`.
    """
    keep = mask_for_call(mask, batch_size, num_heads, text_len, image_len, device)
    if not isinstance(keep, Tensor):  # None, or prepared already (checked for these sizes)
        return keep
    visible = any_last(keep)
    try:
        empty_rows = not bool(visible.all())
    except RuntimeError:  # no values to look at (meta): assume some, and the guard runs
        empty_rows = True
    additive = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    additive.masked_fill_(~keep, float("-inf"))
    return PreparedMask(keep=keep, visible=visible, empty_rows=empty_rows, additive=additive)


# --------------------------------------------------------------------------------------------
# Media-location masks for interleaved text and images.
#
# Legend: ``b`` batch, ``t`` text tokens, ``m`` media (images) per row, ``n`` tokens per medium.
# An image is marked by one token in the text (``<image>``, ``<|image|>``): ``media_locations``
# is True there. The ``k``-th marker of a row (counting from 0) is that row's medium ``k``, whose
# ``n`` feature tokens are columns ``k·n .. k·n + n - 1`` of the flattened ``(b, m·n, E)`` media.
# Each policy gives every token a contiguous range ``[first, end)`` of media it may see; the
# marker token itself already sees its image, and no token ever sees a later image.
# --------------------------------------------------------------------------------------------

MediaPolicy = Literal["immediate", "all_previous", "grouped"]
MEDIA_POLICIES: tuple[str, ...] = get_args(MediaPolicy)


def media_locations_from_ids(input_ids: Tensor, image_token_id: int) -> Tensor:
    """``(b, t)`` token ids -> ``(b, t)`` bool, True where ``input_ids == image_token_id``.

    Raises:
        TypeError: ``input_ids`` is not an integer tensor, or ``image_token_id`` not an int.
        ValueError: ``input_ids`` is not of rank 2.
    """
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must have shape (b, t), got rank {input_ids.dim()} shape "
            f"{_fmt(input_ids.shape)}"
        )
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
        raise TypeError(
            f"image_token_id must be an int, got {type(image_token_id).__name__} {image_token_id!r}"
        )
    return input_ids == image_token_id


def _check_locations(media_locations: object) -> Tensor:
    if not isinstance(media_locations, Tensor):
        raise TypeError(
            f"media_locations must be a torch.Tensor, got {type(media_locations).__name__}"
        )
    if media_locations.dim() != 2:
        raise ValueError(
            f"media_locations must have shape (b, t), got rank {media_locations.dim()} shape "
            f"{_fmt(media_locations.shape)}"
        )
    if media_locations.is_floating_point() or media_locations.is_complex():
        raise TypeError(
            f"media_locations must be boolean (or integer 0/1), got dtype {media_locations.dtype}"
        )
    return media_locations if media_locations.dtype == torch.bool else media_locations != 0


def visible_media_range(
    media_locations: Tensor, *, policy: MediaPolicy = "immediate"
) -> tuple[Tensor, Tensor]:
    """For every token, the media it may see: indices ``first <= k < end`` (0-based).

    Args:
        media_locations: ``(b, t)`` bool (or 0/1 integers), True where an image marker is.
        policy: ``"immediate"``, ``"all_previous"`` or ``"grouped"`` (see
            :func:`media_attention_mask`).

    Returns:
        ``(first, end)``, two ``(b, t)`` int64 tensors. ``end`` is the number of markers at or
        before the token, so ``end == 0`` (an empty range) means "sees no image". The ranges are
        what a block-sparse or ``flex_attention`` mask needs: column ``c`` is visible to token
        ``t`` iff ``first[t] <= c // n < end[t]``.
    """
    loc = _check_locations(media_locations)
    if policy not in MEDIA_POLICIES:
        raise ValueError(f"policy must be one of {MEDIA_POLICIES}, got {policy!r}")
    end = loc.long().cumsum(dim=-1)  # (b, t): markers so far = 1 + index of the last image seen
    if policy == "immediate":
        first = (end - 1).clamp(min=0)
    elif policy == "all_previous":
        first = torch.zeros_like(end)
    else:  # grouped: markers on adjacent positions form one group
        after_marker = F.pad(loc[:, :-1], (1, 0), value=False)  # (b, t): a marker at t - 1
        group_start = loc & ~after_marker  # (b, t): the first marker of a group
        # the 1-based index of the last group's first image; indices only grow, so a running max
        first = torch.where(group_start, end, 0).cummax(dim=-1).values
        first = (first - 1).clamp(min=0)
    return first, end


def media_attention_mask(
    media_locations: Tensor,
    tokens_per_media: int,
    *,
    num_media: int | None = None,
    policy: MediaPolicy = "immediate",
) -> Tensor:
    """Which text token may attend to which image token, from where the images are in the text.

    Args:
        media_locations: ``(b, t)`` bool (or 0/1 integers): True at each image's marker token
            (see :func:`media_locations_from_ids`). Padding tokens are simply not markers.
        tokens_per_media: ``n``, the tokens of each medium (e.g. the resampler's latents).
        num_media: ``m``, the media slots in the ``(b, m, n, E)`` media tensor. Default: the
            most markers in any row (this reads the tensor, so pass it under
            ``torch.compile``). A row with more markers than ``m`` is a ``ValueError``; rows with
            fewer leave the extra slots unseen (padding media).
        policy:
            * ``"immediate"`` -- a token sees only the last image at or before it (Flamingo,
              Sec. 2.3 and Fig. 7; OpenFlamingo, Idefics).
            * ``"all_previous"`` -- every image at or before it.
            * ``"grouped"`` -- images on adjacent tokens form a group, and a token sees the
              images of the last group it follows, up to itself (Llama 3.2 Vision's processor).

    Returns:
        ``(b, t, m·n)`` bool keep-mask, columns in the medium-major order of a flattened
        ``(b, m, n, E)`` media tensor: True = may attend. A token with no visible image (before
        the first marker, or in a row without images) has an all-False row; a
        :class:`xmodal.GatedCrossAttentionBlock` passes it through unchanged. No token ever
        sees an image whose marker comes after it.

    Example::

        locations = media_locations_from_ids(input_ids, image_token_id)
        mask = media_attention_mask(locations, n, num_media=m, policy="immediate")
        out = block(text, media, mask)  # media (b, m, n, E)
    """
    if isinstance(tokens_per_media, bool) or not isinstance(tokens_per_media, int):
        raise TypeError(
            f"tokens_per_media must be an int, got {type(tokens_per_media).__name__} "
            f"{tokens_per_media!r}"
        )
    if tokens_per_media <= 0:
        raise ValueError(f"tokens_per_media must be positive, got {tokens_per_media}")
    if num_media is not None and (isinstance(num_media, bool) or not isinstance(num_media, int)):
        raise TypeError(
            f"num_media must be an int or None, got {type(num_media).__name__} {num_media!r}"
        )
    if num_media is not None and num_media < 0:
        raise ValueError(f"num_media must be non-negative, got {num_media}")
    first, end = visible_media_range(media_locations, policy=policy)  # (b, t) each
    if num_media is None:
        num_media = int(end[:, -1].max()) if end.numel() else 0
    elif end.numel() and not torch.compiler.is_compiling():
        most = int(end[:, -1].max())
        if most > num_media:
            raise ValueError(
                f"media_locations has a row with {most} image markers, but num_media is "
                f"{num_media}; pass num_media >= {most} (media slots in the media tensor)"
            )
    media_of_column = (
        torch.arange(num_media * tokens_per_media, device=end.device) // tokens_per_media
    )  # (m·n,)
    return (media_of_column >= first[..., None]) & (media_of_column < end[..., None])
