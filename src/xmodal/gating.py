"""Tanh gates: a learned scalar (or per-channel) factor ``tanh(alpha)`` on a residual branch.

Legend: ``b`` batch, ``t`` text tokens, ``D`` channels (the text width).

Flamingo (Alayrac et al. 2022, eq. in Fig. 4) adds each new cross-attention and feed-forward
branch to a frozen language model through ``tanh(alpha)`` with ``alpha`` initialised to 0, so
that at the start of training the new layers contribute nothing and the language model behaves
exactly as before.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TanhGate"]


class TanhGate(nn.Module):
    """Multiply the input by ``tanh(alpha)``: scalar, or one ``alpha`` per channel.

    Args:
        init: the initial value of ``alpha`` (default ``0.0``: the gate is closed and the gated
            branch contributes exactly nothing -- ``x * tanh(0) == 0``). Training from scratch,
            a small non-zero value (e.g. ``0.1``) lets gradients reach the gated branch from the
            first step.
        dim: ``None`` for a single scalar gate (parameter shape ``(1,)``, as in OpenFlamingo and
            HF Mllama), or the channel count ``D`` for a per-channel gate (parameter shape
            ``(D,)``, HF Idefics' ``alpha_type="vector"``).

    Shapes:
        input ``(..., D)``, output the same. The gate is cast to the input's dtype, so a float32
        gate works on bf16/fp16 activations.
    """

    def __init__(self, init: float = 0.0, *, dim: int | None = None) -> None:
        super().__init__()
        if isinstance(init, bool) or not isinstance(init, (int, float)):
            raise TypeError(f"init must be a float, got {type(init).__name__} {init!r}")
        if not math.isfinite(init):
            raise ValueError(f"init must be finite, got {init}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise TypeError(f"dim must be an int or None, got {type(dim).__name__} {dim!r}")
        if dim is not None and dim <= 0:
            raise ValueError(f"dim must be positive or None, got {dim}")
        self.dim = dim
        self.alpha = nn.Parameter(torch.full((1 if dim is None else dim,), float(init)))

    def extra_repr(self) -> str:
        return "scalar" if self.dim is None else f"dim={self.dim}"

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x * tanh(alpha)``; ``x`` is ``(..., D)`` (any shape for a scalar gate)."""
        if self.dim is not None and (x.dim() == 0 or x.shape[-1] != self.dim):
            raise ValueError(
                f"x must have last dimension {self.dim} for this per-channel gate, got shape "
                f"{tuple(x.shape)}"
            )
        return x * torch.tanh(self.alpha).to(x.dtype)
