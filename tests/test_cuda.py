"""CUDA checks of the attention core: every SDPA backend, every dtype, the masking rules.

These run only where a CUDA device is present (CI has none; they are run on a lent GPU machine
with ``python -m pytest tests/test_cuda.py`` and the results recorded in docs/benchmarks.md).
On a CPU-only machine the whole module is skipped with that reason.
"""

from __future__ import annotations

import pytest
import torch

from xmodal import CrossModalAttention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Tolerances against a float64 CPU computation of the same module: half-precision inputs carry
# a relative rounding error of 2^-11 (fp16) / 2^-8 (bf16) per element; through two projections,
# a softmax and a weighted sum of up to 64 terms that grows to ~1e-2 (bf16) / ~2e-3 (fp16).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-4),  # TF32 is off below; fp32 kernels reorder sums
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _backends() -> list[str]:
    from torch.nn.attention import SDPBackend

    names = ["MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"]
    return [n for n in names if hasattr(SDPBackend, n)]


def _masks(b: int, t: int, i: int) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    per_query = torch.rand(b, t, i, generator=g) > 0.5
    per_query[0, 1] = False  # a text token that sees no image token
    padding = torch.ones(b, i, dtype=torch.bool)
    padding[1, i // 2 :] = False
    padding[0] = False  # a batch element with no visible image
    return {"none": None, "padding": padding, "per_query": per_query}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mask_kind", ["none", "padding", "per_query"])
@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_cuda_matches_float64(
    dtype: torch.dtype, backend: str, mask_kind: str, num_kv_heads: int
) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    b, t, i, d_text, d_image = 2, 9, 37, 64, 48
    torch.manual_seed(0)
    ref = CrossModalAttention(d_text, 4, image_dim=d_image, head_dim=32, num_kv_heads=num_kv_heads)
    ref = ref.double().eval()
    text, image = torch.randn(b, t, d_text).double(), torch.randn(b, i, d_image).double()
    mask = _masks(b, t, i)[mask_kind]
    want, want_w = ref(text, image, mask)

    attn = CrossModalAttention(d_text, 4, image_dim=d_image, head_dim=32, num_kv_heads=num_kv_heads)
    attn.load_state_dict(ref.state_dict())
    attn = attn.to("cuda", dtype).eval()
    x, y = text.to("cuda", dtype).requires_grad_(), image.to("cuda", dtype).requires_grad_()
    m = None if mask is None else mask.cuda()
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            fused, _ = attn(x, y, m, need_weights=False)
            fused.float().square().sum().backward()
    except RuntimeError as err:  # a backend that does not serve this case says so
        if "No available kernel" in str(err):
            pytest.skip(f"{backend} does not serve {dtype} with mask={mask_kind}: {err}")
        raise
    explicit, weights = attn(x.detach(), y.detach(), m)

    torch.testing.assert_close(fused.double().cpu(), want, **TOL[dtype])
    torch.testing.assert_close(explicit.double().cpu(), want, **TOL[dtype])
    torch.testing.assert_close(weights.double().cpu(), want_w, **TOL[dtype])
    assert x.grad is not None
    assert y.grad is not None
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(y.grad).all()
    if mask_kind == "per_query":  # the blind token's query gradient is exactly zero
        assert x.grad[0, 1].abs().max().item() == 0.0


def test_cuda_large_fused_memory_is_linear() -> None:
    """The fused path never materialises b·h·t·i scores on the GPU either."""
    attn = CrossModalAttention(1024, 16).to("cuda", torch.bfloat16).eval()
    text = torch.randn(1, 2048, 1024, device="cuda", dtype=torch.bfloat16)
    image = torch.randn(1, 4096, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        attn(text, image, need_weights=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        attn(text, image, need_weights=False)
        extra = torch.cuda.max_memory_allocated() - base
    scores_bytes = 1 * 16 * 2048 * 4096 * 2  # what the explicit path would hold in bf16
    assert extra < scores_bytes / 4, (extra, scores_bytes)
