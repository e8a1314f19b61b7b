"""Run a benchmark grid and collect every figure into one JSON-ready dictionary.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width.

:func:`run` is what ``xmodal bench`` and the scripts in ``benchmarks/`` call. For each cell it
makes one set of inputs, builds every implementation that can take the cell, times them in
interleaved rounds (:func:`xmodal.bench.measure.time_interleaved`), measures their peak extra
memory in a fresh child process, and derives GFLOP/s, the fraction of the same-dtype GEMM
throughput measured in the same run (before the first cell and after the last; the better of
the two is the reference) and the speed-up over the notebook's code. Progress is logged
(``logging.INFO``); nothing is printed.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from xmodal.bench.grid import DTYPES, Cell, cell_flops, make_cells
from xmodal.bench.impls import Impl, Prepared, make_inputs, select_impls
from xmodal.bench.measure import (
    Stats,
    Step,
    cell_to_dict,
    gemm_gflops,
    hold_freed_memory,
    make_step,
    memory_in_subprocess,
    peak_extra_memory,
    time_interleaved,
)

__all__ = ["BenchConfig", "find_decode_script", "machine_info", "run", "timing_process"]

logger = logging.getLogger(__name__)

PEERS = ("transformers", "flamingo-pytorch", "numpy")
GEMM_ROW = "gemm-reference"  # the row of each cell that times an n x n GEMM in its rounds


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how carefully."""

    preset: str = "quick"  # a name in xmodal.bench.grid.PRESETS
    impls: tuple[str, ...] | None = None  # implementation names; None = all
    dtypes: tuple[str, ...] | None = None  # restrict the preset's cells; None = as the preset
    modes: tuple[str, ...] | None = None
    device: str = "cpu"  # "cpu" or "cuda"
    threads: int | None = None  # torch threads; None = os.cpu_count()
    rounds: int = 5  # interleaved timing rounds per cell, at least
    budget_s: float = 0.0  # more rounds (up to 4x) while a cell's timing fits in this budget
    warmup: int = 2  # warm-up calls per implementation
    min_sample_s: float = 0.01  # each timing sample loops calls for at least this long
    memory: bool = True  # measure peak extra memory (a child process per cell on CPU)
    gemm_n: int = 1024  # square GEMM size of the throughput reference
    decode: bool = True  # include benchmarks/bench_decode.py's results when it exists
    quick: bool = True  # passed on to bench_decode.py
    hold_memory: bool = True  # keep glibc malloc from trimming the heap (see hold_freed_memory)


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [w for w in wanted if w in flags]
    return []


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command() -> str:
    prog = Path(sys.argv[0]).name
    if prog == "__main__.py":
        prog = "python -m xmodal.bench"
    elif prog == "xmodal":
        prog = "xmodal"
    return " ".join([prog, *sys.argv[1:]])


def machine_info(device: torch.device) -> dict[str, object]:
    """Machine, software and thread settings, for the report's header."""
    info: dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "xmodal": _version("xmodal"),
        "peers": {name: _version(name) for name in PEERS},
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "command": _command(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    with contextlib.suppress(OSError):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def timing_process(threads: int = 1, *, hold_memory: bool = True) -> str:
    """Set this process up for timing, as the ``benchmarks/`` scripts do; return a header line.

    Fixes torch's threads, keeps glibc from trimming the heap (:func:`hold_freed_memory`,
    unless ``hold_memory`` is false) and names the date, CPU, torch, threads, load and malloc
    setting, so that every script's figures say where they were measured.
    """
    torch.set_num_threads(threads)
    malloc = hold_freed_memory() if hold_memory else "system default"
    load = ""
    with contextlib.suppress(OSError):
        load = f"; load {tuple(round(x, 2) for x in os.getloadavg())}"
    return (
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {_cpu_model()} "
        f"({os.cpu_count()} logical CPUs); torch {torch.__version__}; "
        f"{torch.get_num_threads()} thread(s){load}; malloc {malloc}"
    )


def find_decode_script() -> Path | None:
    """``benchmarks/bench_decode.py`` in the current directory or the source checkout."""
    here = Path(__file__).resolve()
    for root in (Path.cwd(), here.parents[3] if len(here.parents) > 3 else None):
        if root is not None and (root / "benchmarks" / "bench_decode.py").is_file():
            return root / "benchmarks" / "bench_decode.py"
    return None


def _run_decode(config: BenchConfig, threads: int | None = None) -> dict[str, object]:
    script = find_decode_script()
    if script is None:
        return {"skipped": "benchmarks/bench_decode.py not found (decode step not benchmarked)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "decode.json"
        cmd = [sys.executable, str(script), "--json", str(out)]
        cmd += ["--quick"] if config.quick else []
        cmd += ["--device", config.device] if config.device != "cpu" else []
        cmd += ["--threads", str(threads)] if threads else []
        cmd += [] if config.hold_memory else ["--system-malloc"]
        logger.info("decode: %s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            return {"skipped": f"{script.name} timed out"}
        result: dict[str, object] = {"command": " ".join(cmd[1:]), "stdout": proc.stdout}
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            result["skipped"] = f"{script.name} exited with {proc.returncode}: {tail}"
        elif out.is_file():
            result["results"] = json.loads(out.read_text())
    return result


def _stats_ms(stats: Stats) -> dict[str, object]:
    return {
        "median_ms": stats.median * 1e3,
        "q1_ms": stats.q1 * 1e3,
        "q3_ms": stats.q3 * 1e3,
        "min_ms": stats.min * 1e3,
        "max_ms": stats.max * 1e3,
        "samples_ms": [s * 1e3 for s in stats.samples],
        "calls_per_sample": stats.calls_per_sample,
        "cpu_median_ms": None if stats.cpu_median is None else stats.cpu_median * 1e3,
        "cpu_samples_ms": [s * 1e3 for s in stats.cpu_samples],
    }


def _run_cell(
    cell: Cell, impls: list[Impl], config: BenchConfig, device: torch.device, threads: int
) -> list[dict[str, object]]:
    rows: dict[str, dict[str, object]] = {}
    runnable: list[Impl] = []
    for impl in impls:
        row: dict[str, object] = {"impl": impl.name, "family": impl.family, "bias": impl.bias}
        reason = impl.skip_reason(cell, device)
        if reason is not None:
            row.update(status="skipped", note=reason)
        else:
            runnable.append(impl)
        rows[impl.name] = row

    inputs = make_inputs(cell, device)
    steps = {}
    for impl in runnable:
        try:
            steps[impl.name] = make_step(impl, cell, inputs, device)
        except Exception as err:
            rows[impl.name].update(status="skipped", note=f"failed to build: {err}"[:160])
    # The GEMM reference is timed in the same interleaved rounds as the implementations, so that
    # "% of GEMM" compares figures taken under the same load (this machine is shared).
    gen = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(config.gemm_n, config.gemm_n, generator=gen).to(device, cell.torch_dtype)
        for _ in range(2)
    )
    steps[GEMM_ROW] = Step(Prepared(lambda: a @ b), inputs, "ref", train=False)
    rows[GEMM_ROW] = {"impl": GEMM_ROW, "family": "ref", "gemm_n": config.gemm_n}
    timed = time_interleaved(
        steps,
        device=device,
        rounds=config.rounds,
        warmup=config.warmup,
        min_sample_s=config.min_sample_s,
        budget_s=config.budget_s,
    )
    ok = [name for name, t in timed.items() if isinstance(t, Stats) and name != GEMM_ROW]
    for name, t in timed.items():
        if isinstance(t, Stats):
            rows[name].update(status="ok", **_stats_ms(t))
        else:
            rows[name].update(status="skipped", note=t)

    if config.memory and ok:
        if device.type == "cuda":
            for name in ok:
                try:
                    rows[name]["peak_extra_bytes"] = peak_extra_memory(steps[name], device)
                except Exception as err:  # pragma: no cover - needs a GPU
                    rows[name]["memory_note"] = f"failed: {err}"[:160]
        else:
            steps.clear()
            del inputs
            for name, mem in memory_in_subprocess(cell, ok, threads=threads).items():
                if isinstance(mem, int):
                    rows[name]["peak_extra_bytes"] = mem
                else:
                    rows[name]["memory_note"] = mem
    return list(rows.values())


def _derive(rows: list[dict[str, object]], cell: Cell, gemm: dict[str, float]) -> None:
    """Add GFLOP/s, fraction of GEMM throughput and speed-up over the notebook to ``rows``.

    The fraction is of the GEMM timed in the cell's own rounds; ``gemm`` (the run's start/end
    reference) stands in only when that one failed.
    """
    notebook = next((r for r in rows if r["impl"] == "notebook" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok":
            continue
        median_ms = row["median_ms"]
        assert isinstance(median_ms, float)
        if row["family"] == "ref":
            n = row["gemm_n"]
            assert isinstance(n, int)
            row["flops"] = 2 * n**3
        else:
            row["flops"] = cell_flops(cell, core=row["family"] == "core")
        assert isinstance(row["flops"], int)
        row["gflops"] = row["flops"] / (median_ms * 1e-3) / 1e9
    ref = next((r for r in rows if r["family"] == "ref" and r["status"] == "ok"), None)
    reference = gemm[cell.dtype] if ref is None else ref["gflops"]
    assert isinstance(reference, float)
    for row in rows:
        if row["status"] != "ok":
            continue
        gflops, median_ms = row["gflops"], row["median_ms"]
        assert isinstance(gflops, float)
        assert isinstance(median_ms, float)
        row["frac_gemm"] = gflops / reference
        if notebook is not None and row["family"] == "module":
            nb = notebook["median_ms"]
            assert isinstance(nb, float)
            row["speedup_vs_notebook"] = nb / median_ms
            nb_cpu, cpu = notebook.get("cpu_median_ms"), row.get("cpu_median_ms")
            if isinstance(nb_cpu, float) and isinstance(cpu, float) and cpu > 0:
                row["cpu_speedup_vs_notebook"] = nb_cpu / cpu


def _assemble(
    meta: dict[str, object],
    impls: list[Impl],
    per_cell: list[tuple[Cell, list[dict[str, object]]]],
    gemm_start: dict[str, float],
    gemm_end: dict[str, float],
    gemm_n: int,
) -> dict[str, object]:
    gemm = {d: max(gemm_start[d], gemm_end[d]) for d in gemm_start}
    meta["gemm_gflops"] = {
        d: {"start": gemm_start[d], "end": gemm_end[d], "reference": gemm[d], "n": gemm_n}
        for d in gemm
    }
    rows: list[dict[str, object]] = []
    for cell, cell_rows in per_cell:
        _derive(cell_rows, cell, gemm)
        rows += [{"cell": cell.label, **cell_to_dict(cell), **row} for row in cell_rows]
    return {
        "meta": meta,
        "impls": {impl.name: impl.description for impl in impls},
        "rows": rows,
    }


def run(
    config: BenchConfig, *, on_cell: Callable[[dict[str, object]], None] | None = None
) -> dict[str, object]:
    """Run the grid ``config`` describes; return metadata, every row and the decode results.

    ``on_cell``, if given, gets the partial result after each cell (figures derived against
    the GEMM reference measured so far), so that a run cut short still leaves its rows.
    """
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch.cuda.is_available() is False")
    threads = config.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only possible before any inter-op work
        torch.set_num_interop_threads(1)

    cells = make_cells(config.preset, dtypes=config.dtypes, modes=config.modes)
    impls = select_impls(config.impls)
    meta = machine_info(device)
    meta.update(preset=config.preset, rounds=config.rounds, warmup=config.warmup)
    meta["malloc"] = hold_freed_memory() if config.hold_memory else "system default"
    meta["budget_s"] = config.budget_s
    meta["min_sample_s"] = config.min_sample_s
    dtypes = sorted({c.dtype for c in cells})
    gemm_start = {d: gemm_gflops(DTYPES[d], device, n=config.gemm_n) for d in dtypes}
    logger.info("GEMM %s GFLOP/s (n=%d)", gemm_start, config.gemm_n)

    per_cell: list[tuple[Cell, list[dict[str, object]]]] = []
    for n, cell in enumerate(cells, 1):
        logger.info("[%d/%d] %s", n, len(cells), cell.label)
        per_cell.append((cell, _run_cell(cell, impls, config, device, threads)))
        if on_cell is not None:
            on_cell(_assemble(meta, impls, per_cell, gemm_start, gemm_start, config.gemm_n))

    gemm_end = {d: gemm_gflops(DTYPES[d], device, n=config.gemm_n) for d in dtypes}
    with contextlib.suppress(OSError):
        meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result = _assemble(meta, impls, per_cell, gemm_start, gemm_end, config.gemm_n)
    if config.decode:
        result["decode"] = _run_decode(config, threads)
    return result
