"""Block-sparse media attention (flex_attention) against dense masked SDPA, in inference.

Legend: ``b`` batch, ``t`` text tokens, ``m`` media, ``n`` tokens per medium, ``i = m·n`` image
tokens, ``h`` heads, ``d`` head width.

An interleaved document: ``t = 1024`` text tokens, ``m = 8`` images of ``n = 64`` tokens
(``i = 512``), ``h = 8``, ``d = 64``, batch 1; image markers every 128 tokens ("regular") or at
random positions ("random"). The attention core alone, queries/keys/values given:

* ``dense``: :func:`xmodal.attend` with the dense ``(1, 1, t, i)`` media mask -- the fused SDPA
  path every xmodal module takes;
* ``sdpa``: bare ``scaled_dot_product_attention`` with the same mask (no zero-row handling);
* ``sdpa_nomask``: no mask at all -- the floor of the dense approach;
* ``flex64`` / ``flex128``: :func:`xmodal.sparse.flex_attend` (compiled flex_attention) with a
  :func:`xmodal.sparse.media_block_mask` of 64- or 128-token tiles.

Timings are medians of interleaved repeats in ``torch.inference_mode`` (compile time, and the
time to build a block mask, are reported apart). Policies ``immediate`` (a token sees one
image) and ``all_previous`` (every earlier image: a denser mask)::

    python benchmarks/bench_flex.py [--quick] [--json PATH] [--device cpu|cuda]

``run(quick=...)`` returns the rows for the ``xmodal bench`` runner.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xmodal import attend, media_attention_mask
from xmodal.sparse import FLEX_AVAILABLE, flex_attend, media_block_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import add_common_args, run_script, time_interleaved

T, M, N, H, HEAD_DIM = 1024, 8, 64, 8, 64


def _locations(layout: str, seed: int = 0) -> torch.Tensor:
    """``(1, t)`` image markers: every ``t / m`` tokens, or ``m`` random (sorted) positions."""
    locations = torch.zeros(1, T, dtype=torch.bool)
    if layout == "regular":
        locations[0, :: T // M] = True
    else:
        g = torch.Generator().manual_seed(seed)
        locations[0, torch.randperm(T, generator=g)[:M]] = True
    return locations


def flex_rows(*, quick: bool = False, device: str = "cpu") -> list[dict[str, object]]:
    if not FLEX_AVAILABLE:
        return [{"bench": "flex", "skipped": f"no flex_attention in torch {torch.__version__}"}]
    dev = torch.device(device)
    rows: list[dict[str, object]] = []
    dtypes = ("fp32",) if quick else ("fp32", "bf16")
    layouts = ("regular",) if quick else ("regular", "random")
    policies = ("immediate",) if quick else ("immediate", "all_previous")
    # flex's CUDA kernel needs tiles that are multiples of 128; on CPU 64 is allowed (and wins)
    block_sizes = ((64,) if quick else (64, 128)) if dev.type == "cpu" else (128,)
    for dtype_name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, H, T, HEAD_DIM, generator=g).to(dev, dtype)
        k = torch.randn(1, H, M * N, HEAD_DIM, generator=g).to(dev, dtype)
        v = torch.randn(1, H, M * N, HEAD_DIM, generator=g).to(dev, dtype)
        for layout in layouts:
            locations = _locations(layout).to(dev)
            for policy in policies:
                dense = media_attention_mask(locations, N, num_media=M, policy=policy)  # type: ignore[arg-type]
                dense = dense[:, None]  # (1, 1, t, i)
                fns = {
                    "dense": functools.partial(attend, q, k, v, dense),
                    "sdpa": functools.partial(F.scaled_dot_product_attention, q, k, v, dense),
                    "sdpa_nomask": functools.partial(F.scaled_dot_product_attention, q, k, v),
                }
                extra: dict[str, object] = {}
                with torch.inference_mode():
                    want, _ = attend(q, k, v, dense)
                    for bs in block_sizes:
                        make = functools.partial(
                            media_block_mask,
                            locations,
                            N,
                            num_media=M,
                            policy=policy,  # type: ignore[arg-type]
                            block_size=bs,
                        )
                        make()  # the first call in a process traces the mask function
                        start = time.perf_counter()
                        block_mask = make()
                        extra[f"flex{bs}_block_mask_ms"] = (time.perf_counter() - start) * 1e3
                        extra[f"flex{bs}_sparsity"] = block_mask.sparsity()
                        fn = functools.partial(flex_attend, q, k, v, block_mask)
                        start = time.perf_counter()
                        got = fn()
                        extra[f"flex{bs}_first_call_s"] = time.perf_counter() - start
                        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
                        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
                        fns[f"flex{bs}"] = fn
                repeats = 7 if quick else 21
                med = time_interleaved(fns, repeats=repeats, device=dev)
                row: dict[str, object] = {
                    "bench": "flex",
                    "dtype": dtype_name,
                    "device": dev.type,
                    "layout": layout,
                    "policy": policy,
                    "text_len": T,
                    "media": M,
                    "tokens_per_media": N,
                    "heads": H,
                    "head_dim": HEAD_DIM,
                    "mask_density": float(dense.float().mean()),
                    **{f"{name}_ms": s * 1e3 for name, s in med.items()},
                    **extra,
                    "repeats": repeats,
                }
                best_flex = min((s, name) for name, s in med.items() if name.startswith("flex"))
                row["best_flex"] = best_flex[1]
                row["speedup_vs_dense"] = med["dense"] / best_flex[0]
                rows.append(row)
    return rows


def run(quick: bool = False, *, device: str = "cpu") -> list[dict[str, object]]:
    """The rows of this benchmark (for ``xmodal bench``)."""
    return flex_rows(quick=quick, device=device)


def format_rows(rows: list[dict[str, object]]) -> str:
    if rows and "skipped" in rows[0]:
        return f"skipped: {rows[0]['skipped']}"
    names = [
        n for n in ("dense", "sdpa", "sdpa_nomask", "flex64", "flex128") if f"{n}_ms" in rows[0]
    ]
    out = [
        f"{'dtype':5s} {'layout':8s} {'policy':12s} {'density':>7s} "
        + " ".join(f"{n + ' ms':>14s}" for n in names)
        + f" {'flex vs dense':>13s}"
    ]
    for r in rows:
        out.append(
            f"{r['dtype']!s:5s} {r['layout']!s:8s} {r['policy']!s:12s} {r['mask_density']:>7.3f} "
            + " ".join(f"{r[n + '_ms']:>14.2f}" for n in names)
            + f" {r['speedup_vs_dense']:>12.2f}x"
        )
    first = rows[0]
    details = ", ".join(
        f"flex{bs}: sparsity {first[f'flex{bs}_sparsity']:.1f}%, block mask "
        f"{first[f'flex{bs}_block_mask_ms']:.1f} ms, "
        f"first call (compile) {first[f'flex{bs}_first_call_s']:.1f} s"
        for bs in (64, 128)
        if f"flex{bs}_sparsity" in first
    )
    out.append(f"(first row) {details}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fp32, one layout and policy")
    add_common_args(parser)
    args = parser.parse_args(argv)
    return run_script(args, lambda: run(args.quick, device=args.device), format_rows)


if __name__ == "__main__":
    raise SystemExit(main())
