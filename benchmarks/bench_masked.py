"""The masked paths of CrossModalAttention at the notebook's shape, every path, both dtypes.

Legend: ``b`` batch, ``t`` text, ``i`` image tokens, ``D`` width, ``h`` heads.

``b4 t20 i196 D256 h8`` with a ``(b, i)`` key-padding mask (the last quarter of every other
sample padded), one thread, medians of 15 samples: the absorbed and projected paths
(``need_weights=False``), the explicit path (``need_weights=True``) and forward+backward.
Run it before and after a change to the masking code (docs/benchmarks.md, "Masked paths")::

    python benchmarks/bench_masked.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from xmodal import CrossModalAttention
from xmodal.bench.runner import timing_process

B, T, N, D, H = 4, 20, 196, 256, 8


def median_ms(fn: Callable[[], object], calls: int = 30) -> float:
    fn()
    samples = []
    for _ in range(15):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def measure(dtype: torch.dtype) -> dict[str, float]:
    """Median ms of each path in ``dtype``."""
    torch.manual_seed(0)
    attn = CrossModalAttention(D, H, dropout=0.0).to(dtype)
    text, image = torch.randn(B, T, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1::2, -N // 4 :] = False
    times = {}
    with torch.inference_mode():
        for absorb in (True, False):
            attn.absorb_projections = absorb
            name = "absorbed" if absorb else "projected"
            times[name] = median_ms(lambda: attn(text, image, mask, need_weights=False))
        times["weights"] = median_ms(lambda: attn(text, image, mask, need_weights=True))
    attn.absorb_projections = True
    trainable = text.clone().requires_grad_(True)

    def train_step() -> None:
        out, _ = attn(trainable, image, mask, need_weights=False)
        out.sum().backward()

    times["training"] = median_ms(train_step, calls=10)
    return times


def main() -> None:
    print(timing_process(threads=1))
    for dtype in (torch.float32, torch.bfloat16):
        times = measure(dtype)
        print(f"{str(dtype)[6:]:9}" + "  ".join(f"{k} {v:.3f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
