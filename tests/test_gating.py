"""TanhGate: x * tanh(alpha), scalar or per-channel; closed at init."""

from __future__ import annotations

import math

import pytest
import torch

from xmodal import TanhGate


def test_zero_init_closes_the_gate_exactly() -> None:
    x = torch.randn(2, 3, 8)
    out = TanhGate()(x)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("init", [0.5, -1.0])
def test_scalar_gate_scales_by_tanh_alpha(init: float) -> None:
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    gate = TanhGate(init).double()
    assert gate.alpha.shape == (1,)
    torch.testing.assert_close(gate(x), x * math.tanh(init), rtol=0, atol=1e-15)


def test_per_channel_gate_scales_each_channel() -> None:
    gate = TanhGate(0.3, dim=4)
    with torch.no_grad():
        gate.alpha.copy_(torch.tensor([0.0, 0.5, -0.5, 2.0]))
    x = torch.randn(2, 5, 4)
    expected = x * torch.tanh(torch.tensor([0.0, 0.5, -0.5, 2.0]))
    torch.testing.assert_close(gate(x), expected)
    assert torch.equal(gate(x)[..., 0], torch.zeros(2, 5))


def test_gate_follows_input_dtype() -> None:
    gate = TanhGate(0.7)  # float32 parameter
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    out = gate(x)
    assert out.dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: relative error up to ~2**-8 per rounding.
    torch.testing.assert_close(out.float(), x.float() * math.tanh(0.7), rtol=1e-2, atol=1e-2)


def test_gradient_reaches_alpha() -> None:
    gate = TanhGate(0.0)
    x = torch.randn(4, 6)
    gate(x).sum().backward()
    assert gate.alpha.grad is not None
    # d/dalpha sum(x * tanh(alpha)) at 0 = sum(x) * (1 - tanh(0)^2) = sum(x)
    torch.testing.assert_close(gate.alpha.grad, x.sum().reshape(1))


def test_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match=r"init must be a float, got str"):
        TanhGate("0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"init must be finite, got nan"):
        TanhGate(float("nan"))
    with pytest.raises(ValueError, match=r"dim must be positive or None, got 0"):
        TanhGate(dim=0)
    with pytest.raises(ValueError, match=r"last dimension 4 .* got shape \(2, 3\)"):
        TanhGate(dim=4)(torch.zeros(2, 3))
