"""Where keys and values live in memory, and what it costs SDPA and the K/V product on CPU.

Legend: ``b`` batch, ``t`` text (query) tokens, ``i`` image tokens, ``E`` image width, ``h``
heads, ``d`` head width.

Two measurements behind two rules of :mod:`xmodal.attention`:

1. **Strided or contiguous keys and values for SDPA** (``_contiguous_kv_is_faster``). The
   stacked K/V product gives ``(b, h, i, d)`` views whose rows lie ``2·h·d`` apart. SDPA on
   those views against SDPA on contiguous copies, the copy included, over query lengths, in
   float32 and bf16.
2. **One 32 MiB product or two of 16 MiB** (``_fresh_pages_each_call``). Each in a fresh
   process, since whether glibc maps a block that large afresh on every call depends on what
   the process allocated before: time and minor page faults per call of the stacked product at
   ``i4096 E1024 h16 d64`` in float32 (exactly 32 MiB), and of the two half products.

One thread, interleaved rounds in a shuffled order, medians. ::

    python benchmarks/bench_kv_layout.py            # ~3 minutes
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from xmodal.bench.runner import timing_process

ROUNDS = 11
# (t, i, E, h, d): the query lengths around the rule's threshold (128), and the grid's shapes
LAYOUT_SHAPES = [
    (32, 1601, 4096, 32, 128),
    (64, 1601, 1024, 16, 64),
    (96, 1601, 1024, 16, 64),
    (128, 1601, 1024, 16, 64),
    (128, 576, 1024, 16, 64),
    (256, 1601, 1024, 16, 64),
    (256, 4096, 1024, 16, 64),
    (2048, 576, 1024, 8, 128),
    (2048, 4096, 1024, 16, 64),
]


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, float]:
    """Median ms per call of each function, timed in shuffled interleaved rounds."""
    order = random.Random(0)
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    next(iter(fns.values()))()
    calls = max(1, int(0.05 / (time.perf_counter() - start)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            samples[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def layout(dtype: torch.dtype) -> None:
    """SDPA on the stacked product's K/V views against contiguous copies (copy included)."""
    for t, i, e, h, d in LAYOUT_SHAPES:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, t, h, d, generator=gen).to(dtype).transpose(1, 2)  # (1, h, t, d)
        kv = torch.randn(1, i, 2 * h * d, generator=gen).to(dtype)  # the stacked product
        k, v = kv.view(1, i, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # (1, h, i, d) views

        def strided() -> object:
            return F.scaled_dot_product_attention(q, k, v)  # noqa: B023

        def copied() -> object:
            return F.scaled_dot_product_attention(q, k.contiguous(), v.contiguous())  # noqa: B023

        with torch.inference_mode():
            ms = interleaved_ms({"strided": strided, "copied": copied})
        print(
            f"{str(dtype)[6:]:9} t{t:<5} i{i:<5} E{e:<5} h{h:<3} d{d:<4} "
            f"views {ms['strided']:8.2f} ms  copy+contiguous {ms['copied']:8.2f} ms  "
            f"copy is {ms['strided'] / ms['copied']:.2f}x as fast",
            flush=True,
        )


def product_child(split: bool) -> dict[str, float]:
    """In this (fresh) process: ms and page faults per call of the K/V product(s)."""
    timing_process(threads=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4096, 1024, generator=gen)
    w = torch.randn(2 * 1024, 1024, generator=gen) / 32  # stacked (2·h·d, E), h16 d64

    def step() -> object:
        if split:
            return F.linear(x, w[:1024]), F.linear(x, w[1024:])  # 16 MiB each
        return F.linear(x, w)  # 32 MiB

    with torch.inference_mode():
        step()
        times, faults = [], []
        for _ in range(7):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": statistics.median(times), "faults": statistics.median(faults)}


def products() -> None:
    """The stacked 32 MiB product against two 16 MiB ones, each in fresh processes."""
    for run in range(3):
        figures = {}
        for split in (False, True):
            out = subprocess.run(
                [sys.executable, __file__, "--product-child", "split" if split else "stacked"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            figures[split] = json.loads(out.strip().splitlines()[-1])
        one, two = figures[False], figures[True]
        print(
            f"process pair {run + 1}: one 32 MiB product {one['ms']:.1f} ms, "
            f"{one['faults']:.0f} page faults/call; two 16 MiB products {two['ms']:.1f} ms, "
            f"{two['faults']:.0f} page faults/call",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--product-child", choices=["stacked", "split"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.product_child:
        print(json.dumps(product_child(args.product_child == "split")))
        return
    print(timing_process(threads=1))
    for dtype in (torch.float32, torch.bfloat16):
        layout(dtype)
    products()


if __name__ == "__main__":
    main()
