"""FeedForward: norm -> linear -> activation -> linear, plain and gated (SwiGLU/GEGLU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xmodal import FeedForward


def test_plain_gelu_matches_its_definition() -> None:
    ff = FeedForward(8, mult=2).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    n = F.layer_norm(x, (8,), ff.norm.weight, ff.norm.bias, eps=1e-5)
    expected = F.gelu(n @ ff.proj_in.weight.T) @ ff.proj_out.weight.T
    torch.testing.assert_close(ff(x), expected, rtol=1e-12, atol=1e-12)
    assert ff.proj_in.weight.shape == (16, 8)
    assert ff.proj_gate is None
    assert ff.proj_in.bias is None  # Flamingo-family feed-forwards have no bias


def test_swiglu_with_rmsnorm_and_hidden_dim_override() -> None:
    norm = nn.RMSNorm(8, eps=1e-6)
    ff = FeedForward(8, activation="swiglu", hidden_dim=11, norm=norm).double()
    assert ff.norm is norm
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert ff.proj_gate is not None
    expected = (F.silu(n @ ff.proj_gate.weight.T) * (n @ ff.proj_in.weight.T)) @ (
        ff.proj_out.weight.T
    )
    torch.testing.assert_close(ff(x), expected, rtol=1e-12, atol=1e-12)
    assert ff.hidden_dim == 11


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"])
def test_every_activation_keeps_shape_and_is_finite(activation: str) -> None:
    ff = FeedForward(16, mult=2, activation=activation, bias=True, norm="rmsnorm")
    out = ff(torch.randn(3, 16))
    assert out.shape == (3, 16)
    assert torch.isfinite(out).all()
    assert ff.proj_out.bias is not None


def test_norm_none_is_identity() -> None:
    ff = FeedForward(4, norm="none")
    assert isinstance(ff.norm, nn.Identity)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"activation must be one of .* got 'tanh'"):
        FeedForward(8, activation="tanh")
    with pytest.raises(ValueError, match=r"norm must be one of .* got 'batchnorm'"):
        FeedForward(8, norm="batchnorm")
    with pytest.raises(ValueError, match=r"hidden_dim must be a positive int, got 0"):
        FeedForward(8, hidden_dim=0)
    with pytest.raises(TypeError, match=r"dim must be an int, got float"):
        FeedForward(8.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\), got shape \(2, 7\)"):
        FeedForward(8)(torch.zeros(2, 7))
