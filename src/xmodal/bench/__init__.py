"""``xmodal bench``: timings and memory of xmodal against the notebook, PyTorch and peers.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width.

* :mod:`xmodal.bench.grid` -- shapes, cells, presets and the FLOP formula;
* :mod:`xmodal.bench.impls` -- the implementations compared (peers skipped when missing);
* :mod:`xmodal.bench.measure` -- interleaved timing, GEMM reference, peak-memory child process;
* :mod:`xmodal.bench.runner` -- :func:`run` a grid into one JSON-ready dictionary;
* :mod:`xmodal.bench.report` -- terminal table, Markdown, target checks, plot;
* :mod:`xmodal.bench.notebook` -- the seed notebook's class, verbatim (the naive baseline).

The command line is :mod:`xmodal.cli.bench`; the scripts in ``benchmarks/`` are presets of it.
"""

from xmodal.bench.grid import Cell, Shape, make_cells
from xmodal.bench.runner import BenchConfig, run

__all__ = ["BenchConfig", "Cell", "Shape", "make_cells", "run"]
