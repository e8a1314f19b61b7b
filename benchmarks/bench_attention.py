"""Issue 2's comparison: xmodal vs the notebook's code vs nn.MultiheadAttention.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width.

At the notebook's shape (b4 t20 i196 D256 h8) and at b1 t2048 i4096 D1024 h16, fp32 and bf16,
forward in inference mode, on the same inputs in one process (memory in a child per cell).
A preset of ``xmodal bench``; every option of it works here too::

    python benchmarks/bench_attention.py [--json PATH] [--markdown PATH] [--threads N]

Without ``--impl`` it compares xmodal (both paths), the notebook's class and
nn.MultiheadAttention (both ``need_weights``), plus the attention cores alone.
"""

import sys

from xmodal.cli.bench import main

ISSUE2_IMPLS = "xmodal,xmodal-weights,notebook,torch-mha,torch-mha-weights,core:xmodal,core:sdpa"

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("--impl") for a in args):
        args = ["--impl", ISSUE2_IMPLS, *args]
    sys.exit(main(["--preset", "issue2", "--no-decode", *args], prog="bench_attention.py"))
