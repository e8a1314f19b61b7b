"""The full grid behind ``docs/benchmarks.md``: ``xmodal bench --preset full`` as a script.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width.

    python benchmarks/bench_grid.py --json docs/benchmarks.json --plot docs/benchmarks.png \
        --markdown /tmp/tables.md

About 30 cells (see ``xmodal bench --preset full --list``); 15-25 minutes on two cores.
Includes ``benchmarks/bench_decode.py``'s decode-step results when that script exists.
"""

import sys

from xmodal.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["--preset", "full", *sys.argv[1:]], prog="bench_grid.py"))
