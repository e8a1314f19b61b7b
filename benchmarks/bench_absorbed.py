"""Where does absorbing the key/value projections pay? The sweep behind ABSORB_MAX_COST_RATIO.

Legend: ``b`` batch, ``t`` text, ``i`` image tokens, ``h`` heads, ``k`` key/value heads, ``d``
head width, ``E`` image width.

:class:`xmodal.CrossModalAttention` takes its *absorbed* path (each head attends to the raw
image features with ``q W_k``; ``W_v`` comes after the weighted sum) when
:func:`xmodal.attention.absorbed_is_cheaper` says its arithmetic is at most
``ABSORB_MAX_COST_RATIO[dtype]`` of the projected path's. This script times both paths of the same
module side by side (interleaved rounds, one thread, medians) over text lengths on both sides
of that line, in float32 and bfloat16, inference and forward+backward, and prints the
arithmetic ratio next to the time ratio, so the threshold can be checked on a new machine::

    python benchmarks/bench_absorbed.py            # the sweep (about 3 minutes)
    python benchmarks/bench_absorbed.py --quick    # two shapes

Also times the seed notebook's module at its own shape (4x20 text, 4x196 image, 256 wide,
8 heads), the shape issue 2 sets its 1.4x target at.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xmodal import CrossModalAttention
from xmodal.attention import ABSORB_MAX_COST_RATIO, absorbed_is_cheaper, absorption_costs
from xmodal.bench.notebook import NotebookCrossModalAttention
from xmodal.bench.runner import timing_process


@dataclass(frozen=True)
class Shape:
    b: int
    i: int
    dim: int  # D = E
    h: int
    k: int
    texts: tuple[int, ...]

    @property
    def d(self) -> int:
        return self.dim // self.h

    def sizes(self, t: int) -> dict[str, int]:
        return {
            "num_heads": self.h,
            "num_kv_heads": self.k,
            "head_dim": self.d,
            "image_dim": self.dim,
            "text_len": t,
            "image_len": self.i,
        }


SHAPES = [
    Shape(4, 196, 256, 8, 8, (1, 8, 16, 20, 24, 32, 48)),  # the notebook's
    Shape(1, 576, 1024, 16, 16, (1, 16, 32, 48, 64, 96)),
    Shape(1, 1601, 1024, 8, 8, (1, 32, 64, 96, 128, 192)),  # d = 128
    Shape(1, 576, 1024, 16, 4, (1, 4, 8, 12, 16, 24)),  # GQA, g = 4
]
QUICK = [SHAPES[0], SHAPES[1]]


def timed(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float) -> dict[str, float]:
    """Median ms per call of each function, interleaved rounds of calls lasting >= 20 ms."""
    for fn in fns.values():
        fn()
    calls = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + budget_s
    for r in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            times[name].append((time.perf_counter() - start) / calls[name] * 1e3)
        if r >= 4 and time.perf_counter() > deadline:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def sweep(shape: Shape, dtype: torch.dtype, train: bool) -> None:
    torch.manual_seed(0)
    attn = CrossModalAttention(shape.dim, shape.h, num_kv_heads=shape.k, dropout=0.0).to(dtype)
    attn.train(train)
    image = torch.randn(shape.b, shape.i, shape.dim, dtype=dtype, requires_grad=train)
    for t in shape.texts:
        text = torch.randn(shape.b, t, shape.dim, dtype=dtype, requires_grad=train)

        def run(absorb: bool, text: torch.Tensor = text) -> Callable[[], object]:
            def call() -> object:
                attn.absorb_projections = absorb
                out, _ = attn(text, image, need_weights=False)
                if train:
                    out.sum().backward()
                return out

            return call

        ctx = torch.enable_grad() if train else torch.inference_mode()
        with ctx:
            med = timed({"projected": run(False), "absorbed": run(True)}, rounds=15, budget_s=4)
        projected, absorbed = absorption_costs(**shape.sizes(t))
        ratio = absorbed / projected
        auto = absorbed_is_cheaper(**shape.sizes(t), dtype=dtype)
        taken = "absorbed" if auto else "projected"
        print(
            f"b{shape.b} t{t:<4} i{shape.i:<5} D{shape.dim} h{shape.h} k{shape.k} d{shape.d:<4}"
            f"{str(dtype)[6:]:9} {'train' if train else 'infer'}  cost ratio {ratio:5.2f}  "
            f"projected {med['projected']:8.3f} ms  absorbed {med['absorbed']:8.3f} ms  "
            f"speed-up {med['projected'] / med['absorbed']:5.2f}x  (auto: {taken})",
            flush=True,
        )


def notebook_shape(dtype: torch.dtype) -> None:
    """xmodal (both paths) against the seed notebook's module at its own example shape."""
    b, t, i, dim, h = 4, 20, 196, 256, 8
    torch.manual_seed(0)
    attn = CrossModalAttention(dim, h, dropout=0.0).eval().to(dtype)
    notebook = NotebookCrossModalAttention(dim, h).eval().to(dtype)
    notebook.load_state_dict(attn.state_dict())
    text, image = torch.randn(b, t, dim, dtype=dtype), torch.randn(b, i, dim, dtype=dtype)

    def xmodal(absorb: bool) -> Callable[[], object]:
        def call() -> object:
            attn.absorb_projections = absorb
            return attn(text, image, need_weights=False)

        return call

    with torch.inference_mode():
        attn.absorb_projections = True
        gap = (attn(text, image, need_weights=False)[0] - notebook(text, image)[0]).abs().max()
        med = timed(
            {
                "notebook": lambda: notebook(text, image),
                "xmodal": xmodal(True),
                "xmodal-projected": xmodal(False),
            },
            rounds=31,
            budget_s=8,
        )
    print(
        f"notebook shape b4 t20 i196 D256 h8 {str(dtype)[6:]:9} infer  max |xmodal - notebook| "
        f"{gap.item():.1e}; notebook {med['notebook']:.3f} ms, xmodal {med['xmodal']:.3f} ms "
        f"({med['notebook'] / med['xmodal']:.2f}x), projected {med['xmodal-projected']:.3f} ms "
        f"({med['notebook'] / med['xmodal-projected']:.2f}x)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, inference only")
    parser.add_argument("--shapes", type=int, nargs="*", help="indices into SHAPES (default all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(
        f"{timing_process(args.threads)}; ABSORB_MAX_COST_RATIO "
        + str({str(k)[6:]: v for k, v in ABSORB_MAX_COST_RATIO.items()}),
        flush=True,
    )
    for dtype in (torch.float32, torch.bfloat16):
        notebook_shape(dtype)
    shapes = QUICK if args.quick else SHAPES
    if args.shapes:
        shapes = [SHAPES[n] for n in args.shapes]
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for train in (False,) if args.quick else (False, True):
                sweep(shape, dtype, train)
    print(f"load {os.getloadavg()} at the end", flush=True)


if __name__ == "__main__":
    main()
