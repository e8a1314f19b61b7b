"""Where the time goes: the profiles behind the "targets" section of docs/benchmarks.md.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width,
``D`` width.

1. ``torch.profiler`` tables (self CPU time by operator) of xmodal's fused path and of the
   notebook's class, at the notebook's shape and at b1 t2048 i4096 D1024 h16, in a dtype.
2. The attention core against its limits: SDPA's GFLOP/s next to the same-dtype GEMM, the two
   attention products alone as batched matmuls, and the softmax alone over the full scores.

    python benchmarks/profile_attention.py [--threads 1] [--dtype fp32|bf16] [--skip-large]
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from xmodal import CrossModalAttention
from xmodal.bench.notebook import NotebookCrossModalAttention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_table(b: int, t: int, i: int, dim: int, h: int, dtype: torch.dtype, calls: int) -> None:
    text, image = torch.randn(b, t, dim).to(dtype), torch.randn(b, i, dim).to(dtype)
    xm = CrossModalAttention(embed_dim=dim, num_heads=h, dropout=0.0).eval().to(dtype)
    nb = NotebookCrossModalAttention(embed_dim=dim, num_heads=h).eval().to(dtype)
    runs = {
        "xmodal (need_weights=False)": lambda: xm(text, image, need_weights=False),
        "notebook": lambda: nb(text, image),
    }
    for name, fn in runs.items():
        with torch.inference_mode():
            fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    fn()
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / calls / 1e3
        print(f"\n-- {name}, b{b} t{t} i{i} D{dim} h{h} {dtype}: {total:.2f} ms per call")
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        for e in events[:6]:
            ms = e.self_cpu_time_total / calls / 1e3
            print(f"   {e.key:45s} {ms:9.3f} ms  {100 * ms / total:5.1f}%  x{e.count // calls}")


def core_limits(dtype: torch.dtype) -> None:
    n = 2048
    a, c = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    gemm = 2 * n**3 / seconds(lambda: a @ c) / 1e9
    print(f"\n-- attention core vs limits, {dtype}: GEMM {n}^3 = {gemm:.0f} GFLOP/s")
    for t, i, h, d in ((2048, 4096, 16, 64), (2048, 4096, 8, 128), (256, 4096, 16, 64)):
        q = torch.randn(1, h, t, d).to(dtype)
        k, v = torch.randn(1, h, i, d).to(dtype), torch.randn(1, h, i, d).to(dtype)
        scores = torch.randn(1, h, t, i).to(dtype)
        flops = 4 * h * t * i * d
        with torch.inference_mode():
            sdpa = seconds(lambda: F.scaled_dot_product_attention(q, k, v))  # noqa: B023
            bmm = seconds(lambda: (q @ k.transpose(-1, -2)) @ v)  # noqa: B023
            soft = seconds(lambda: torch.softmax(scores, dim=-1))  # noqa: B023
        rate = flops / sdpa / 1e9
        print(
            f"   t{t} i{i} h{h} d{d}: SDPA {sdpa * 1e3:6.0f} ms = {rate:5.0f} GFLOP/s "
            f"({100 * rate / gemm:3.0f}% of GEMM) | the two products as bmm "
            f"{bmm * 1e3:6.0f} ms | softmax of the full scores {soft * 1e3:6.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append")
    parser.add_argument("--skip-large", action="store_true", help="only the notebook's shape")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for name in args.dtype or ["fp32", "bf16"]:
        dtype = DTYPES[name]
        op_table(4, 20, 196, 256, 8, dtype, calls=50)
        if not args.skip_large:
            op_table(1, 2048, 4096, 1024, 16, dtype, calls=2)
            core_limits(dtype)


if __name__ == "__main__":
    main()
