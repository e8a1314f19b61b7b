"""A naive float64 reference for the Flamingo blocks, written from the paper's equations.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``m`` media, ``n`` tokens per
medium, ``l`` latents, ``h`` heads, ``d`` head width.

Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning":

* Fig. 4 (gated xattn-dense)::

      y = y + tanh(alpha_xattn) * attention(q=y, kv=x)
      y = y + tanh(alpha_dense) * ffw(y)

* Fig. 5 (Perceiver resampler)::

      x_f = flatten(x_f + time_embeddings)
      x = x + attention_i(q=x, kv=concat([x_f, x]));  x = x + ffw_i(x)

* Fig. 7 / Sec. 2.3 (per-image attention masking): a text token attends only to the visual
  tokens of the last image that appeared before it.

Nothing here imports from ``xmodal``: weights are read from a module's ``state_dict`` by name,
everything is computed in float64 with plain tensor operations, one formula per line, and
masks are built with Python loops over tokens and images.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64


def _sd(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to(F64) for k, v in module.state_dict().items()}


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def attention(
    q_in: Tensor,
    kv_in: Tensor,
    sd: dict[str, Tensor],
    *,
    heads: int,
    kv_heads: int,
    qk_eps: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over heads; ``mask (b, t, i)`` True = may attend.

    A query that may see nothing gets a zero context. K/V head ``j`` serves query heads
    ``j·g .. j·g + g - 1`` (``g = heads // kv_heads``), as in grouped-query attention.
    """
    b, t, _ = q_in.shape
    i = kv_in.shape[1]
    q = q_in @ sd["text_query.weight"].T
    k = kv_in @ sd["image_key.weight"].T
    v = kv_in @ sd["image_value.weight"].T
    d = q.shape[-1] // heads
    q = q.reshape(b, t, heads, d).permute(0, 2, 1, 3)  # (b, h, t, d)
    k = k.reshape(b, i, kv_heads, d).permute(0, 2, 1, 3)  # (b, k, i, d)
    v = v.reshape(b, i, kv_heads, d).permute(0, 2, 1, 3)
    if "q_norm.weight" in sd:
        eps = torch.finfo(F64).eps if qk_eps is None else qk_eps
        q = rms_norm(q, sd["q_norm.weight"], eps)
        k = rms_norm(k, sd["k_norm.weight"], eps)
    group = heads // kv_heads
    k = torch.stack([k[:, hh // group] for hh in range(heads)], dim=1)  # (b, h, i, d)
    v = torch.stack([v[:, hh // group] for hh in range(heads)], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (b, h, t, i)
    if mask is not None:
        keep = mask[:, None].expand_as(scores)
        scores = scores.masked_fill(~keep, -math.inf)
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(keep.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    else:
        probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).permute(0, 2, 1, 3).reshape(b, t, heads * d)  # (b, t, h·d)
    out = out @ sd["output_proj.weight"].T
    if "output_proj.bias" in sd:
        out = out + sd["output_proj.bias"]
    return out


def feed_forward(x: Tensor, sd: dict[str, Tensor], prefix: str) -> Tensor:
    """LayerNorm -> Linear -> GELU -> Linear (no biases), Flamingo's ``ffw``."""
    h = layer_norm(x, sd[f"{prefix}norm.weight"], sd[f"{prefix}norm.bias"])
    h = gelu(h @ sd[f"{prefix}proj_in.weight"].T)
    return h @ sd[f"{prefix}proj_out.weight"].T


def _sub(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def gated_block(block: torch.nn.Module, text: Tensor, media: Tensor, mask: Tensor | None) -> Tensor:
    """Fig. 4 for a default ``GatedCrossAttentionBlock``; ``media (b, i, E)``, ``mask (b, t, i)``.

    Tokens whose mask row is all False are returned unchanged (both branches skipped).
    """
    sd = _sd(block)
    y, x = text.to(F64), media.to(F64)
    qk_eps = None
    if getattr(block.attn, "q_norm", None) is not None:
        qk_eps = block.attn.q_norm.eps
    attn_out = attention(
        layer_norm(y, sd["norm.weight"], sd["norm.bias"]),
        x,
        _sub(sd, "attn."),
        heads=block.attn.num_heads,
        kv_heads=block.attn.num_kv_heads,
        qk_eps=qk_eps,
        mask=mask,
    )
    sees = torch.ones(y.shape[:2], dtype=torch.bool) if mask is None else mask.any(-1)
    sees = sees[..., None].to(F64)  # (b, t, 1): 1 where the token sees an image
    y = y + sees * torch.tanh(sd["attn_gate.alpha"]) * attn_out
    y = y + sees * torch.tanh(sd["ff_gate.alpha"]) * feed_forward(y, sd, "ff.")
    return y


def resampler(module: torch.nn.Module, media: Tensor) -> Tensor:
    """Fig. 5 for a ``PerceiverResampler``; ``media (b, m, f, n, D)`` -> ``(b, m, l, D)``."""
    sd = _sd(module)
    x_all = media.to(F64)
    b, m, f, n, dim = x_all.shape
    out = torch.empty(b, m, sd["latents"].shape[0], dim, dtype=F64)
    depth = len(module.layers)
    for bi in range(b):
        for mi in range(m):
            x_f = x_all[bi, mi]  # (f, n, D)
            if "frame_embed" in sd:
                x_f = x_f + sd["frame_embed"][:f, None, :]
            x_f = x_f.reshape(f * n, dim)
            if "media_embed" in sd:
                x_f = x_f + sd["media_embed"][mi]
            x = sd["latents"].clone()  # (l, D)
            for k in range(depth):
                p = f"layers.{k}."
                layer = module.layers[k]
                xn = layer_norm(x, sd[p + "norm_latents.weight"], sd[p + "norm_latents.bias"])
                fn = layer_norm(x_f, sd[p + "norm_media.weight"], sd[p + "norm_media.bias"])
                kv = torch.cat([fn, xn], dim=0)
                x = (
                    x
                    + attention(
                        xn[None],
                        kv[None],
                        _sub(sd, p + "attn."),
                        heads=layer.attn.num_heads,
                        kv_heads=layer.attn.num_kv_heads,
                    )[0]
                )
                x = x + feed_forward(x, sd, p + "ff.")
            out[bi, mi] = layer_norm(x, sd["norm.weight"], sd["norm.bias"])
    return out


def media_mask(
    media_locations: Tensor, tokens_per_media: int, num_media: int, policy: str
) -> Tensor:
    """``(b, t)`` image markers -> ``(b, t, num_media · n)`` keep-mask, with Python loops.

    * ``immediate``: token ``t`` sees image ``j`` iff ``j`` is the last image at or before ``t``.
    * ``all_previous``: iff image ``j`` is at or before ``t``.
    * ``grouped``: Llama 3.2 Vision's processor (``get_cross_attention_token_mask``): image ``j``
      covers tokens ``[pos_j, pos_{j+1})``, the last image to the end, and an image directly
      followed by another image inherits the span end of that next image.
    """
    b, t = media_locations.shape
    n = tokens_per_media
    out = torch.zeros(b, t, num_media * n, dtype=torch.bool)
    for bi in range(b):
        pos = [p for p in range(t) if bool(media_locations[bi, p])]
        if policy in ("immediate", "all_previous"):
            for p in range(t):
                seen = [j for j, q in enumerate(pos) if q <= p]
                if not seen:
                    continue
                visible = seen[-1:] if policy == "immediate" else seen
                for j in visible:
                    if j < num_media:
                        out[bi, p, j * n : (j + 1) * n] = True
        elif policy == "grouped":
            spans = [[pos[j], pos[j + 1] if j + 1 < len(pos) else t] for j in range(len(pos))]
            last_end = t
            for span in reversed(spans):
                if span[0] == span[1] - 1:
                    span[1] = last_end
                last_end = span[1]
            for j, (start, end) in enumerate(spans):
                if j < num_media:
                    out[bi, start:end, j * n : (j + 1) * n] = True
        else:
            raise ValueError(policy)
    return out
