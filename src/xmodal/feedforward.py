"""The position-wise feed-forward branch of a Flamingo block: norm -> linear -> act -> linear.

Legend: ``b`` batch, ``t`` tokens, ``D`` width (``dim``), ``F`` hidden width (``hidden_dim``).

Two shapes of feed-forward are in use in the models xmodal interoperates with:

* **plain** (Flamingo, OpenFlamingo, flamingo-pytorch): ``down(act(up(norm(x))))`` with GELU;
* **gated** (SwiGLU, Llama-family: HF Idefics, HF Mllama): ``down(silu(gate(n)) * up(n))``
  with ``n = norm(x)``; GEGLU is the same with GELU.

The norm is part of the module (it is the "post-attention" norm of a Llama-style decoder layer),
and it is injectable so a converter can match a foreign layer's norm and epsilon exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeedForward"]

# activation name -> (function, gated?)
_ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], bool]] = {
    "gelu": (F.gelu, False),  # exact erf GELU, as torch.nn.GELU() (OpenFlamingo)
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), False),
    "relu": (F.relu, False),
    "silu": (F.silu, False),
    "swiglu": (F.silu, True),  # Shazeer 2020; Llama, Idefics, Mllama
    "geglu": (F.gelu, True),
}
_NORMS = ("layernorm", "rmsnorm", "none")


def _make_norm(norm: str | nn.Module, dim: int) -> nn.Module:
    if isinstance(norm, nn.Module):
        return norm
    if norm == "layernorm":
        return nn.LayerNorm(dim)
    if norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-5)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {_NORMS} or an nn.Module, got {norm!r}")


class FeedForward(nn.Module):
    """``x -> down(act(up(norm(x))))``, or the gated ``down(act(gate(n)) * up(n))``.

    Args:
        dim: input and output width ``D``.
        mult: hidden width multiplier: ``F = mult * dim`` unless ``hidden_dim`` is given.
        activation: ``"gelu"`` (default, exact), ``"gelu_tanh"``, ``"relu"``, ``"silu"``, or a
            gated variant ``"swiglu"`` / ``"geglu"``, which adds a third projection ``proj_gate``.
        hidden_dim: the hidden width ``F`` exactly (overrides ``mult``), for layers whose width
            is not a multiple of ``dim`` (Mllama's ``intermediate_size``).
        bias: whether the linear layers have biases (default ``False``: OpenFlamingo, Idefics
            and Mllama feed-forwards have none).
        norm: ``"layernorm"`` (default, eps 1e-5), ``"rmsnorm"`` (eps 1e-5), ``"none"``, or a
            pre-built module taking and returning ``(..., D)``, e.g.
            ``nn.RMSNorm(dim, eps=config.rms_norm_eps)``.

    Parameters are named ``norm``, ``proj_in`` (``D -> F``, Llama's ``up_proj``), ``proj_gate``
    (``D -> F``, gated variants only, Llama's ``gate_proj``) and ``proj_out`` (``F -> D``).

    Shapes:
        input ``(..., D)``, output ``(..., D)``.
    """

    def __init__(
        self,
        dim: int,
        mult: float = 4,
        *,
        activation: str = "gelu",
        hidden_dim: int | None = None,
        bias: bool = False,
        norm: str | nn.Module = "layernorm",
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
        if hidden_dim is None:
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult <= 0:
                raise ValueError(f"mult must be a positive number, got {mult!r}")
            hidden_dim = int(mult * dim)
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")

        self.dim = dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        self._act, gated = _ACTIVATIONS[activation]
        self.norm = _make_norm(norm, dim)
        self.proj_in = nn.Linear(dim, hidden_dim, bias=bias)
        self.proj_gate = nn.Linear(dim, hidden_dim, bias=bias) if gated else None
        self.proj_out = nn.Linear(hidden_dim, dim, bias=bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, activation={self.activation!r}"

    def forward(self, x: Tensor) -> Tensor:
        """Apply the feed-forward to ``x`` of shape ``(..., D)``; returns ``(..., D)``."""
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got shape {tuple(x.shape)}")
        n = self.norm(x)
        if self.proj_gate is None:
            h = self._act(self.proj_in(n))  # (..., F)
        else:
            h = self._act(self.proj_gate(n)) * self.proj_in(n)  # (..., F)
        return self.proj_out(h)
