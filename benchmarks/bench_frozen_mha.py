"""Why ``xmodal bench`` leaves peers' weights trainable: frozen nn.MultiheadAttention on CPU.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``D`` width.

``nn.MultiheadAttention(batch_first=True)`` used for cross-attention (query is not key) with
weights that do not require grad -- a frozen language model, as in Flamingo -- is several times
slower on CPU than the same module with trainable weights, even under ``inference_mode``: its
inputs are transposed to ``(i, b, D)`` views, and ``F.linear`` on such a view with a weight that
needs no gradient takes ``matmul``'s broadcast path, which copies the ``(D, 2·D)`` K/V weight
once per image position (``(i, D, 2·D)``) before a ``bmm``. xmodal's module does not transpose.

    python benchmarks/bench_frozen_mha.py [--threads 1] [--rounds 15]
"""

import argparse
import statistics
import time

import torch

from xmodal import CrossModalAttention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    b, t, i, d, h = 4, 20, 196, 256, 8  # the notebook's shape
    print(f"torch {torch.__version__}, {args.threads} thread(s), b{b} t{t} i{i} D{d} h{h}")
    for dtype in (torch.float32, torch.bfloat16):
        mha = torch.nn.MultiheadAttention(d, h, batch_first=True).eval().to(dtype)
        xm = CrossModalAttention(embed_dim=d, num_heads=h).eval().to(dtype)
        text, image = torch.randn(b, t, d).to(dtype), torch.randn(b, i, d).to(dtype)
        calls = {
            "torch-mha": (mha, lambda: mha(text, image, image, need_weights=False)),  # noqa: B023
            "xmodal": (xm, lambda: xm(text, image, need_weights=False)),  # noqa: B023
        }
        times: dict[tuple[str, bool], list[float]] = {}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, (module, call) in calls.items():
                    for frozen in (False, True):
                        for p in module.parameters():
                            p.requires_grad_(not frozen)
                        call()  # warm-up after the switch
                        start = time.perf_counter()
                        call()
                        times.setdefault((name, frozen), []).append(time.perf_counter() - start)
        for (name, frozen), samples in times.items():
            median = 1e3 * statistics.median(samples)
            print(f"{dtype!s:15s} {name:9s} frozen={frozen!s:5s}  median {median:8.2f} ms")


if __name__ == "__main__":
    main()
