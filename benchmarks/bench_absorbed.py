"""Would "absorbing" the key and value projections close the 1.4x gap at the notebook's shape?

Legend: ``b`` batch, ``t`` text, ``i`` image tokens, ``h`` heads, ``d`` head width, ``E`` image
width.

For short text, ``q_h·(W_k,h x)`` can be computed as ``(q_h W_k,h)·x``: every head attends
to the raw image features ``x`` (width ``E``) with the query ``q_h W_k,h``, and ``W_v,h`` is applied
after the weighted sum (the key bias drops out of the softmax; the value bias is added back).
That skips the ``i·E·h·d`` projections at the price of ``h`` times wider attention products. At
``b4 t20 i196 D256 h8`` it cuts the arithmetic by about 1.4x. This script checks that it is
exact and times it against xmodal's fused path and the notebook's code, interleaved, on one
thread. The result: slower (SDPA at head width 256 and the batched small products cost more
than the projections they save), so xmodal does not use it.

    python benchmarks/bench_absorbed.py
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from xmodal import CrossModalAttention
from xmodal.bench.notebook import NotebookCrossModalAttention

B, T, N, D, H = 4, 20, 196, 256, 8  # the notebook's example (N image tokens)


def main() -> None:
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}; torch {torch.__version__}; 1 thread")
    for dtype in (torch.float32, torch.bfloat16):
        measure(dtype)


def measure(dtype: torch.dtype) -> None:
    """Check the absorbed form is exact, then time the three side by side in ``dtype``."""
    d = D // H
    torch.manual_seed(0)
    attn = CrossModalAttention(D, H, dropout=0.0).eval().to(dtype)
    notebook = NotebookCrossModalAttention(D, H).eval().to(dtype)
    notebook.load_state_dict(attn.state_dict())
    text, image = torch.randn(B, T, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    w_k = attn.image_key.weight.view(H, d, D)  # (h, d, E)
    w_v = attn.image_value.weight.view(H, d, D)  # (h, d, E)
    b_v = attn.image_value.bias.view(H, 1, d)  # type: ignore[union-attr]

    def absorbed() -> torch.Tensor:
        q = attn.text_query(text).view(B, T, H, d).transpose(1, 2)  # (b, h, t, d)
        q_image = torch.matmul(q, w_k)  # (b, h, t, E): the key bias cancels in the softmax
        x = image[:, None]  # (b, 1, i, E), shared by every head
        ctx = F.scaled_dot_product_attention(q_image, x, x, scale=d**-0.5)  # (b, h, t, E)
        ctx = torch.matmul(ctx, w_v.transpose(1, 2)) + b_v  # (b, h, t, d)
        return attn.output_proj(ctx.transpose(1, 2).reshape(B, T, D))  # (b, t, D)

    impls: dict[str, Callable[[], object]] = {
        "notebook": lambda: notebook(text, image),
        "xmodal": lambda: attn(text, image, need_weights=False),
        "absorbed": absorbed,
    }
    with torch.inference_mode():
        want, _ = attn(text, image, need_weights=False)
        gap = (absorbed() - want).abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(15):  # interleaved rounds
            for name, fn in impls.items():
                fn()
                start = time.perf_counter()
                for _ in range(20):
                    fn()
                times[name].append((time.perf_counter() - start) / 20 * 1e3)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"{dtype!s:15} max |absorbed - xmodal| {gap:.1e}; medians (ms): "
        + ", ".join(f"{n} {m:.3f}" for n, m in med.items())
        + f"; notebook/xmodal {med['notebook'] / med['xmodal']:.2f}x, "
        f"notebook/absorbed {med['notebook'] / med['absorbed']:.2f}x"
    )


if __name__ == "__main__":
    main()
