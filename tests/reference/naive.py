"""A deliberately naive float64 reference for cross-modal attention, written from the equations.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` query heads, ``k`` key/value
heads, ``g = h // k``, ``d`` head width, ``D`` text width, ``E`` image width.

For batch element ``n``, query head ``a`` (which reads key/value head ``a // g``) and text
token ``r``::

    q = rmsnorm?(text[n, r] @ Wq[a].T + bq[a])                       (d,)
    K = rmsnorm?(image[n] @ Wk[a // g].T + bk[a // g])               (i, d)
    V = image[n] @ Wv[a // g].T + bv[a // g]                         (i, d)
    s_j = q · K_j / sqrt(d)               for the visible tokens j (keep[n, a, r, j] is True)
    p_j = exp(s_j - max s) / sum exp(s - max s)        (zero for the tokens that are not visible)
    context[n, a, r] = sum_j p_j V_j      (the zero vector when no token is visible)
    out[n, r] = concat_a(context[n, a, r]) @ Wo.T + bo

Everything runs in float64, one batch element, one head and one query at a time; masked tokens
are *left out* of the softmax rather than filled with a large negative number. Nothing here
calls ``scaled_dot_product_attention`` or shares code with ``xmodal``: it reads the module's
parameters and nothing else, and interprets the mask itself (keep-mask, ranks 2/3/4, sizes of 1
broadcast, non-zero = keep).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["keep_mask", "reference_attention"]


def _pick(mask: Tensor, *index: int) -> Tensor:
    """``mask[index]`` where a dimension of size 1 broadcasts (index taken as 0)."""
    return mask[tuple(0 if size == 1 else j for size, j in zip(mask.shape, index, strict=False))]


def keep_mask(mask: Tensor | None, b: int, h: int, t: int, i: int) -> Tensor:
    """Spell a keep-mask of rank 2 ``(b, i)``, 3 ``(b, t, i)`` or 4 ``(b, h, t, i)`` out in full.

    Returns a ``(b, h, t, i)`` bool tensor, built entry by entry (rows of ``i`` at a time).
    """
    full = torch.ones(b, h, t, i, dtype=torch.bool)
    if mask is None:
        return full
    mask = mask.detach().cpu()
    for n in range(b):
        for a in range(h):
            for r in range(t):
                if mask.dim() == 2:
                    row = _pick(mask, n)
                elif mask.dim() == 3:
                    row = _pick(mask, n, r)
                elif mask.dim() == 4:
                    row = _pick(mask, n, a, r)
                else:
                    raise ValueError(f"reference: unsupported mask rank {mask.dim()}")
                full[n, a, r] = row != 0
    return full


def _rmsnorm(x: Tensor, norm: nn.RMSNorm | None) -> Tensor:
    if norm is None:
        return x
    # nn.RMSNorm(eps=None) uses the machine epsilon of the dtype it runs in: the module's.
    dtype = norm.weight.dtype if norm.weight is not None else torch.float32
    eps = norm.eps if norm.eps is not None else torch.finfo(dtype).eps
    weight = norm.weight.detach().double() if norm.weight is not None else 1.0
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _linear(x: Tensor, layer: nn.Linear, rows: slice) -> Tensor:
    weight = layer.weight.detach().double()[rows]
    out = x @ weight.T
    if layer.bias is not None:
        out = out + layer.bias.detach().double()[rows]
    return out


def reference_attention(
    module: nn.Module, text: Tensor, image: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """What ``module(text, image, mask)`` must return, computed naively in float64.

    Reads ``module``'s parameters (``text_query``, ``image_key``, ``image_value``,
    ``output_proj``, ``q_norm``, ``k_norm``) and its sizes; ignores dropout (evaluation mode).
    Differentiable with respect to ``text`` and ``image``.

    Returns:
        ``(output, weights)``: ``(b, t, D)`` and ``(b, h, t, i)``, both float64.
    """
    text, image = text.double(), image.double()
    b, t, _ = text.shape
    i = image.shape[1]
    h, k, d = module.num_heads, module.num_kv_heads, module.head_dim
    g = h // k
    keep = keep_mask(mask, b, h, t, i)
    q_norm = getattr(module, "q_norm", None)
    k_norm = getattr(module, "k_norm", None)

    outputs, all_weights = [], []
    for n in range(b):
        heads, head_weights = [], []
        for a in range(h):
            kv = a // g  # the key/value head that query head a reads
            q = _rmsnorm(_linear(text[n], module.text_query, slice(a * d, (a + 1) * d)), q_norm)
            key = _rmsnorm(
                _linear(image[n], module.image_key, slice(kv * d, (kv + 1) * d)), k_norm
            )  # (i, d)
            value = _linear(image[n], module.image_value, slice(kv * d, (kv + 1) * d))  # (i, d)
            rows, row_weights = [], []
            for r in range(t):
                visible = keep[n, a, r].nonzero().flatten()  # indices j of the visible tokens
                weights = text.new_zeros(i)
                if len(visible) == 0:
                    rows.append(text.new_zeros(d))  # nothing to see: zero context
                    row_weights.append(weights)
                    continue
                scores = torch.stack([q[r] @ key[j] / math.sqrt(d) for j in visible.tolist()])
                e = torch.exp(scores - scores.max())
                p = e / e.sum()
                weights = weights.index_put((visible,), p)
                rows.append(sum(p[m] * value[j] for m, j in enumerate(visible.tolist())))
                row_weights.append(weights)
            heads.append(torch.stack(rows) if t else text.new_zeros(0, d))  # (t, d)
            head_weights.append(torch.stack(row_weights) if t else text.new_zeros(0, i))
        context = torch.cat(heads, dim=-1)  # (t, h·d)
        outputs.append(_linear(context, module.output_proj, slice(None)))
        all_weights.append(torch.stack(head_weights))  # (h, t, i)
    return torch.stack(outputs), torch.stack(all_weights)
