"""Conversion between ``torch.nn.MultiheadAttention`` and :class:`~xmodal.CrossModalAttention`.

Legend: ``b`` batch, ``t`` text tokens (queries), ``i`` image tokens (keys), ``h`` heads,
``d`` head width, ``D`` = ``embed_dim`` (text width), ``E`` = ``kdim`` = ``vdim`` (image width).

Key mapping (``nn.MultiheadAttention`` -> ``CrossModalAttention``):

=================================  ===========================================================
``in_proj_weight`` ``(3D, D)``     rows ``[0:D]`` -> ``text_query.weight``, ``[D:2D]`` ->
                                   ``image_key.weight``, ``[2D:3D]`` -> ``image_value.weight``
                                   (only when ``kdim == vdim == embed_dim``)
``q_proj_weight`` ``(D, D)``       ``text_query.weight`` (separate layout, ``kdim != embed_dim``)
``k_proj_weight`` ``(D, E)``       ``image_key.weight``
``v_proj_weight`` ``(D, E)``       ``image_value.weight``
``in_proj_bias`` ``(3D,)``         split in three like ``in_proj_weight`` -- packed even when the
                                   weights are separate
``out_proj.weight`` / ``.bias``    ``output_proj.weight`` / ``.bias``
=================================  ===========================================================

Masks: ``nn.MultiheadAttention``'s boolean masks say ``True`` = *ignore*; xmodal's say ``True`` =
*may attend*. :func:`keep_mask_from_torch_mha` converts them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xmodal.attention import CrossModalAttention
from xmodal.interop._load import Remapper, match_source

__all__ = ["from_torch_mha", "keep_mask_from_torch_mha", "to_torch_mha"]

_QKV = ["text_query", "image_key", "image_value"]


def from_torch_mha(mha: nn.MultiheadAttention) -> CrossModalAttention:
    """Convert an ``nn.MultiheadAttention`` into an equivalent :class:`CrossModalAttention`.

    The query is the text (width ``embed_dim``); keys and values are read from the *same* image
    features, so ``kdim`` must equal ``vdim`` (it may differ from ``embed_dim``). The result is
    batch-first whatever ``mha.batch_first`` is, has the same dropout, dtype, device and
    train/eval mode, and owns copies of the weights.

    Call it as ``attn(text, image, keep_mask, need_weights=False)`` where the original was
    ``mha(text, image, image, key_padding_mask=..., attn_mask=...)``; build ``keep_mask`` with
    :func:`keep_mask_from_torch_mha`. Outputs agree to float rounding, except for a query whose
    keys are all masked: xmodal gives it a zero context (output = ``output_proj.bias``);
    ``nn.MultiheadAttention`` gives NaN with ``need_weights=True`` (and, through SDPA, a
    version-dependent answer with ``need_weights=False``).

    Raises:
        TypeError: ``mha`` is not an ``nn.MultiheadAttention``.
        ValueError: ``kdim != vdim``, or ``add_bias_kv`` / ``add_zero_attn`` is set (xmodal has
            no learned or zero extra key); the message names the setting.
        ConversionError: the parameters do not fit (e.g. a hand-edited module).
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
    if mha.kdim != mha.vdim:
        raise ValueError(
            f"mha has kdim={mha.kdim} and vdim={mha.vdim}; CrossModalAttention reads keys and "
            f"values from the same image features, so it needs kdim == vdim"
        )
    if mha.bias_k is not None or mha.bias_v is not None:
        raise ValueError("mha was built with add_bias_kv=True; CrossModalAttention has no bias_k/v")
    if mha.add_zero_attn:
        raise ValueError(
            "mha was built with add_zero_attn=True; CrossModalAttention has no zero key"
        )
    has_bias = mha.in_proj_bias is not None
    attn = CrossModalAttention(
        mha.embed_dim,
        mha.num_heads,
        image_dim=mha.kdim,
        dropout=float(mha.dropout),
        bias=has_bias,
    )
    match_source(attn, mha)

    rm = Remapper(mha.state_dict(), source="nn.MultiheadAttention")
    if mha._qkv_same_embed_dim:
        rm.split("in_proj_weight", [f"{n}.weight" for n in _QKV])  # (3D, D) -> 3 x (D, D)
    else:
        rm.copy("q_proj_weight", "text_query.weight")  # (D, D)
        rm.copy("k_proj_weight", "image_key.weight")  # (D, E)
        rm.copy("v_proj_weight", "image_value.weight")  # (D, E)
    if has_bias:
        rm.split("in_proj_bias", [f"{n}.bias" for n in _QKV])  # (3D,) -> 3 x (D,)
        rm.copy("out_proj.bias", "output_proj.bias")
    rm.copy("out_proj.weight", "output_proj.weight")
    rm.load_into(attn)
    return attn


def to_torch_mha(attn: CrossModalAttention) -> nn.MultiheadAttention:
    """Convert a :class:`CrossModalAttention` into an equivalent batch-first
    ``nn.MultiheadAttention`` (the inverse of :func:`from_torch_mha`; the round trip is exact).

    ``image_dim`` becomes ``kdim`` and ``vdim``; with ``image_dim == embed_dim`` the result uses
    the packed ``in_proj_weight``. Call the result as ``mha(text, image, image,
    key_padding_mask=~keep)`` for a 2-D keep-mask ``keep``.

    Raises:
        TypeError: ``attn`` is not a ``CrossModalAttention``.
        ValueError: ``attn`` uses a feature ``nn.MultiheadAttention`` lacks -- grouped-query
            attention (``num_kv_heads < num_heads``), q/k-norm, or an inner width ``h·d``
            different from ``embed_dim``; the message names it.
    """
    if not isinstance(attn, CrossModalAttention):
        raise TypeError(f"attn must be a CrossModalAttention, got {type(attn).__name__}")
    if attn.num_kv_heads != attn.num_heads:
        raise ValueError(
            f"attn uses grouped-query attention (num_kv_heads={attn.num_kv_heads}, "
            f"num_heads={attn.num_heads}); nn.MultiheadAttention needs num_kv_heads == num_heads"
        )
    if attn.q_norm is not None or attn.k_norm is not None:
        raise ValueError("attn uses qk_norm=True; nn.MultiheadAttention has no q/k norm")
    if attn.inner_dim != attn.embed_dim:
        raise ValueError(
            f"attn has inner width num_heads * head_dim = {attn.inner_dim}, but "
            f"nn.MultiheadAttention needs it equal to embed_dim = {attn.embed_dim}"
        )
    has_bias = attn.text_query.bias is not None
    ref = attn.text_query.weight
    mha = nn.MultiheadAttention(
        attn.embed_dim,
        attn.num_heads,
        dropout=attn.dropout.p,
        bias=has_bias,
        kdim=attn.image_dim,
        vdim=attn.image_dim,
        batch_first=True,
        device=ref.device,
        dtype=ref.dtype,
    )
    mha.train(attn.training)

    rm = Remapper(attn.state_dict(), source="CrossModalAttention")
    if mha._qkv_same_embed_dim:
        _pack(rm, [f"{n}.weight" for n in _QKV], "in_proj_weight")  # 3 x (D, D) -> (3D, D)
    else:
        rm.copy("text_query.weight", "q_proj_weight")  # (D, D)
        rm.copy("image_key.weight", "k_proj_weight")  # (D, E)
        rm.copy("image_value.weight", "v_proj_weight")  # (D, E)
    if has_bias:
        _pack(rm, [f"{n}.bias" for n in _QKV], "in_proj_bias")  # 3 x (D,) -> (3D,)
        rm.copy("output_proj.bias", "out_proj.bias")
    rm.copy("output_proj.weight", "out_proj.weight")
    rm.load_into(mha)
    return mha


def keep_mask_from_torch_mha(
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    *,
    num_heads: int | None = None,
) -> Tensor | None:
    """Turn ``nn.MultiheadAttention`` masks into one xmodal keep-mask (``True`` = may attend).

    Args:
        key_padding_mask: ``(b, i)``; boolean ``True`` = ignore this key, or additive float with
            values ``0`` (keep) and ``-inf`` (ignore).
        attn_mask: ``(t, i)`` or ``(b·h, t, i)``, same conventions.
        num_heads: needed to unfold a ``(b·h, t, i)`` ``attn_mask``.

    Returns:
        ``None`` if both are ``None``; else a boolean keep-mask of rank 2 ``(b, i)``, rank 3
        ``(1, t, i)`` or rank 4 ``(b|1, h|1, t, i)``, ready for :class:`CrossModalAttention`.

    Raises:
        ValueError: a float mask holds values other than ``0`` and ``-inf`` (an additive bias
            is not a mask), an ``attn_mask`` has the wrong rank, or ``num_heads`` is missing
            for a rank-3 ``attn_mask``.
    """
    keep_kp = None if key_padding_mask is None else _keep(key_padding_mask, "key_padding_mask")
    if attn_mask is None:
        return keep_kp
    keep_attn = _keep(attn_mask, "attn_mask")
    if keep_attn.dim() == 2:
        keep_attn = keep_attn[None, None]  # (1, 1, t, i)
    elif keep_attn.dim() == 3:
        if num_heads is None:
            raise ValueError("num_heads is required to unfold an attn_mask of shape (b·h, t, i)")
        bh, t, i = keep_attn.shape
        if bh % num_heads:
            raise ValueError(
                f"attn_mask has leading size {bh}, not a multiple of num_heads={num_heads}"
            )
        keep_attn = keep_attn.view(bh // num_heads, num_heads, t, i)  # (b, h, t, i)
    else:
        raise ValueError(
            f"attn_mask must have shape (t, i) or (b·h, t, i), got {tuple(attn_mask.shape)}"
        )
    if keep_kp is None:
        return keep_attn
    return keep_attn & keep_kp[:, None, None, :]  # (b, h|1, t, i)


def _pack(rm: Remapper, keys: list[str], target: str) -> None:
    parts = [rm.take(k) for k in keys]
    present = [p for p in parts if p is not None]
    rm.put(target, torch.cat(present) if len(present) == len(parts) else None, " + ".join(keys))


def _keep(mask: Tensor, name: str) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be boolean or floating point, got dtype {mask.dtype}")
    neg_inf = torch.isneginf(mask)
    if not bool(((mask == 0) | neg_inf).all()):
        raise ValueError(
            f"{name} is an additive float mask with values other than 0 and -inf; only "
            f"0 (keep) / -inf (ignore) can be turned into a keep-mask"
        )
    return ~neg_inf
