"""Flamingo's Perceiver resampler: a fixed number of learned latents read a variable-size image.

Legend: ``b`` batch, ``m`` media (images or videos) per row, ``f`` frames per medium, ``n``
tokens per frame, ``l`` latents (``num_latents``), ``D`` width (``dim``), ``h`` heads, ``d`` head
width.

Flamingo (Alayrac et al. 2022, Fig. 5)::

    x_f = x_f + time_embeddings            # (f, n, D): one embedding per frame
    x_f = flatten(x_f)                     # (f·n, D)
    for each layer:
        x = x + attention(q=x, kv=concat([x_f, x]))     # x: the latents (l, D)
        x = x + ffw(x)

The latents attend to the media tokens **and to themselves** (keys and values come from
``[media; latents]``), the paper's choice, kept by OpenFlamingo and flamingo-pytorch. Each medium
is resampled on its own: ``(b, m, f, n, D) -> (b, m, l, D)``. The attention is
:class:`xmodal.CrossModalAttention` with ``[norm(media); norm(latents)]`` as its "image".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xmodal.attention import CrossModalAttention, _check_device_dtype
from xmodal.feedforward import FeedForward

__all__ = ["PerceiverLayer", "PerceiverResampler"]


class PerceiverLayer(nn.Module):
    """One resampler layer: latents attend to ``[media; latents]``, then a feed-forward.

    Submodules (``state_dict`` keys): ``norm_media``, ``norm_latents`` (LayerNorms), ``attn`` (a
    :class:`CrossModalAttention` without bias: ``text_query`` reads the latents, ``image_key`` /
    ``image_value`` read ``[media; latents]``), ``ff`` (a :class:`FeedForward`).
    """

    def __init__(self, dim: int, *, num_heads: int, head_dim: int, ff_mult: float) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = CrossModalAttention(dim, num_heads, head_dim=head_dim, dropout=0.0, bias=False)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        """``media (b, i, D)``, ``latents (b, l, D)`` -> updated latents ``(b, l, D)``."""
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(media), q], dim=1)  # (b, i + l, D)
        latents = latents + self.attn(q, kv, need_weights=False)[0]
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Map each medium's variable number of tokens to ``num_latents`` tokens.

    Args:
        dim: width ``D`` of the media features (and of the output).
        depth: number of :class:`PerceiverLayer` s.
        num_latents: output tokens per medium ``l``.
        num_heads, head_dim: attention heads and their width (inner width ``h·d``).
        ff_mult: the feed-forward's hidden width is ``ff_mult · D``.
        max_num_media: if given, a learned embedding per medium index (``media_embed``,
            ``(max_num_media, D)``), added to every token of that medium: the ``k``-th image
            of a row gets embedding ``k``. Inputs with more media are an error.
        max_num_frames: if given, a learned embedding per frame (``frame_embed``,
            ``(max_num_frames, D)``), the paper's "time embeddings" for video.

    Shapes:
        input ``(b, n, D)`` (one image per row), ``(b, m, n, D)`` or ``(b, m, f, n, D)``;
        output ``(b, m, l, D)`` (``m = 1`` for a 3-D input), after a final LayerNorm.

    Parameters: ``latents`` ``(l, D)``, optional ``media_embed`` and ``frame_embed``,
    ``layers.{k}`` (see :class:`PerceiverLayer`), ``norm``. No mask is taken: every latent sees
    every token of its own medium, and nothing of the others.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 6,
        num_latents: int = 64,
        num_heads: int = 8,
        head_dim: int = 64,
        ff_mult: float = 4,
        max_num_media: int | None = None,
        max_num_frames: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("num_latents", num_latents)):
            _check_int(name, value, optional=False)
        _check_int("max_num_media", max_num_media, optional=True)
        _check_int("max_num_frames", max_num_frames, optional=True)
        self.dim = dim
        self.num_latents = num_latents
        self.max_num_media = max_num_media
        self.max_num_frames = max_num_frames
        # Initialised N(0, 1) as in OpenFlamingo / flamingo-pytorch.
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.media_embed = (
            None if max_num_media is None else nn.Parameter(torch.randn(max_num_media, dim))
        )
        self.frame_embed = (
            None if max_num_frames is None else nn.Parameter(torch.randn(max_num_frames, dim))
        )
        self.layers = nn.ModuleList(
            PerceiverLayer(dim, num_heads=num_heads, head_dim=head_dim, ff_mult=ff_mult)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_latents={self.num_latents}, "
            f"max_num_media={self.max_num_media}, max_num_frames={self.max_num_frames}"
        )

    def forward(self, media: Tensor) -> Tensor:
        """Resample ``media`` (``(b, n, D)``, ``(b, m, n, D)`` or ``(b, m, f, n, D)``).

        Returns:
            ``(b, m, num_latents, D)`` in ``media``'s dtype.
        """
        x = self._as_five_d(media)  # (b, m, f, n, D)
        b, m, f, n, dim = x.shape
        if self.frame_embed is not None:
            x = x + self.frame_embed[:f].to(x.dtype)[None, None, :, None, :]
        x = x.reshape(b, m, f * n, dim)  # (b, m, f·n, D)
        if self.media_embed is not None:
            x = x + self.media_embed[:m].to(x.dtype)[None, :, None, :]
        x = x.reshape(b * m, f * n, dim)  # (b·m, f·n, D): each medium on its own
        latents = self.latents.to(x.dtype).expand(b * m, -1, -1)  # (b·m, l, D)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents).reshape(b, m, self.num_latents, dim)  # (b, m, l, D)

    def _as_five_d(self, media: object) -> Tensor:
        if not isinstance(media, Tensor):
            raise TypeError(f"media must be a torch.Tensor, got {type(media).__name__}")
        if media.dim() not in (3, 4, 5) or media.shape[-1] != self.dim:
            raise ValueError(
                f"media must have shape (b, n, {self.dim}), (b, m, n, {self.dim}) or "
                f"(b, m, f, n, {self.dim}), got shape {tuple(media.shape)}"
            )
        if not media.is_floating_point():
            raise TypeError(f"media must be a floating-point tensor, got dtype {media.dtype}")
        _check_device_dtype("media", media, self.latents)
        if media.dim() == 3:
            x = media[:, None, None]  # (b, 1, 1, n, D)
        elif media.dim() == 4:
            x = media[:, :, None]  # (b, m, 1, n, D)
        else:
            x = media
        m, f = x.shape[1], x.shape[2]
        if self.max_num_media is not None and m > self.max_num_media:
            raise ValueError(
                f"media has {m} media per row (shape {tuple(media.shape)}), more than "
                f"max_num_media={self.max_num_media}"
            )
        if self.max_num_frames is not None and f > self.max_num_frames:
            raise ValueError(
                f"media has {f} frames per medium (shape {tuple(media.shape)}), more than "
                f"max_num_frames={self.max_num_frames}"
            )
        return x


def _check_int(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "a positive int or None" if optional else "a positive int"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
