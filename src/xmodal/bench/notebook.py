"""The seed notebook's ``CrossModalAttention``, verbatim: the naive baseline of ``xmodal bench``.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width.

The class below is copied unchanged from ``shared/seed/cross_modal_attention.md`` (its two code
cells joined; only this docstring, the ``noqa`` markers and the alias at the end are added), so
that the benchmark measures the code people start from, bugs included: it materialises the full
``(b, h, t, i)`` scores and weights, needs one width for text and image, and wants a mask that
already broadcasts against ``(b, h, t, i)``. It lives inside the package, not in
``benchmarks/``, because ``xmodal bench`` must run from an installed package.
It is a benchmark baseline, not part of xmodal's API.
"""
# ruff: noqa: N806, RUF100
# mypy: disable-error-code="no-untyped-def"

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NotebookCrossModalAttention"]


# fmt: off
class CrossModalAttention(nn.Module):
    def __init__(self, embed_dim=256, num_heads=8):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads

        # Linear layers to project text features to queries,
        # and image features to keys and values
        self.text_query = nn.Linear(embed_dim, embed_dim)
        self.image_key = nn.Linear(embed_dim, embed_dim)
        self.image_value = nn.Linear(embed_dim, embed_dim)

        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(0.1)

    def forward(self, text_features, image_features, attention_mask=None):
        batch_size, text_len, _ = text_features.shape
        _, image_len, _ = image_features.shape

        # Linear projections
        Q = self.text_query(text_features)      # Queries from text
        K = self.image_key(image_features)      # Keys from image
        V = self.image_value(image_features)    # Values from image

        # Reshape for multi-head attention
        Q = Q.view(batch_size, text_len, self.num_heads, self.head_dim).transpose(1, 2)
        K = K.view(batch_size, image_len, self.num_heads, self.head_dim).transpose(1, 2)
        V = V.view(batch_size, image_len, self.num_heads, self.head_dim).transpose(1, 2)

        # Scaled dot-product attention
        scores = torch.matmul(Q, K.transpose(-2, -1)) / np.sqrt(self.head_dim)
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask == 0, -1e9)

        attention_weights = F.softmax(scores, dim=-1)
        attention_weights = self.dropout(attention_weights)

        # Weighted sum of values
        context = torch.matmul(attention_weights, V)
        context = context.transpose(1, 2).contiguous().view(batch_size, text_len, self.embed_dim)

        output = self.output_proj(context)
        return output, attention_weights
# fmt: on


NotebookCrossModalAttention = CrossModalAttention
