"""Timing, GEMM throughput and peak-memory measurement for ``xmodal bench``.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width.

Timing. Every implementation of a cell is warmed up, then timed in *interleaved* rounds: each
round times every implementation once, in a freshly shuffled order (seeded, so a run can be
repeated), so that a burst of load from other processes on a shared machine falls on all of
them rather than on one. A sample is a loop of ``n`` calls, with ``n`` calibrated so that a
sample lasts at least ``min_sample_s``; the figure kept is seconds per call. The spread over
rounds (quartiles, min and max) is reported with the median.

Shuffled rather than rotated, because what ran just before a sample matters: after the cell's
GEMM reference, the next sample of any implementation ran about 30% slower on this machine (the
GEMM leaves the caches full of its own data and the core at its AVX-512 clock), and a rotation
of a fixed list puts the same implementation after the GEMM in most rounds -- the first one
listed, xmodal: 2 rounds in 3 with three rows, against 1 in 3 for the notebook's code.

The timing process first asks glibc's ``malloc`` to keep freed memory (:func:`hold_freed_memory`).
With its defaults, whether the top of the heap is handed back to the kernel after each call,
and faulted in again by the next, depends on where earlier allocations happened to land: the
same module at the notebook's shape took 1.85 or 2.7 ms per call from one process to the next,
with 570 page faults and 0.5 ms of system time per call in the slow case. That is the
allocator, not the implementation, and it strikes whichever implementation the heap's layout
happens to disfavour; holding freed memory removes it (0 faults per call).

Memory. On CPU, PyTorch allocates with ``malloc``, which ``tracemalloc`` does not see. Each cell
runs in a fresh child process (``python -m xmodal.bench.memory``) that, for each implementation
in turn: builds it, warms it up, returns freed memory to the system (``malloc_trim``), resets the
kernel's resident-set high-water mark (``/proc/self/clear_refs``), runs one call and reads
``VmHWM - VmRSS`` -- the peak *extra* resident memory of the call, outputs and autograd state
included, inputs and weights excluded. The child sets ``MALLOC_MMAP_THRESHOLD_`` so large
blocks are mapped and unmapped at once rather than kept in the heap. On CUDA the same figure
comes from ``torch.cuda.max_memory_allocated`` in the parent process.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from xmodal.bench.grid import Cell, Shape
from xmodal.bench.impls import Impl, Inputs, Prepared, make_inputs, select_impls

__all__ = [
    "Stats",
    "Step",
    "cell_from_dict",
    "cell_to_dict",
    "gemm_gflops",
    "hold_freed_memory",
    "make_step",
    "memory_in_subprocess",
    "peak_extra_memory",
    "summarize",
    "time_interleaved",
]

logger = logging.getLogger(__name__)

MAX_INNER = 10_000  # calls per sample at most
ORDER_SEED = 20261127  # the shuffled order of the implementations in each round

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HOLD_TRIM_BYTES = 1 << 30  # keep up to 1 GiB of freed memory at the top of the heap
_HOLD_MMAP_BYTES = 32 << 20  # glibc's largest mmap threshold: blocks below it come from the heap


def hold_freed_memory() -> str:
    """Keep glibc ``malloc`` from returning freed memory to the kernel between timed calls.

    Sets the trim threshold to 1 GiB and the mmap threshold to 32 MiB (the largest glibc
    accepts; setting only the trim threshold would pin the mmap threshold at its 128 KiB default
    and map every larger block afresh). Process-wide and not undone: call it only in a process
    that exists to time things. Returns what was done, for the report's header.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system default (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = mallopt(_M_TRIM_THRESHOLD, _HOLD_TRIM_BYTES)
    if not (trim and mallopt(_M_MMAP_THRESHOLD, _HOLD_MMAP_BYTES)):
        return "system default (mallopt refused)"
    return "glibc, freed memory held (trim threshold 1 GiB, mmap threshold 32 MiB)"


@dataclass(frozen=True)
class Stats:
    """Seconds per call over the rounds of one implementation in one cell."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    samples: tuple[float, ...]
    calls_per_sample: int
    # CPU seconds per call of this process (all its threads) in each sample: on a shared
    # machine a descheduled process loses wall time but not CPU time, so with one thread this
    # is the figure that contention does not inflate.
    cpu_samples: tuple[float, ...] = ()

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_samples) if self.cpu_samples else None


def summarize(
    samples: list[float], calls_per_sample: int = 1, cpu_samples: list[float] | None = None
) -> Stats:
    """Median, quartiles (inclusive method) and range of ``samples`` (at least one)."""
    if not samples:
        raise ValueError("summarize needs at least one sample, got none")
    if len(samples) == 1:
        q1 = q3 = samples[0]
    else:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Stats(
        median=statistics.median(samples),
        q1=q1,
        q3=q3,
        min=min(samples),
        max=max(samples),
        samples=tuple(samples),
        calls_per_sample=calls_per_sample,
        cpu_samples=tuple(cpu_samples or ()),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One timed step of a prepared implementation: a forward, or forward + backward."""

    def __init__(self, prepared: Prepared, inputs: Inputs, family: str, train: bool) -> None:
        self.prepared = prepared
        self.train = train
        self.grads = [*prepared.params, *inputs.leaves(family)] if train else []
        self.grad_out: Tensor | None = None

    def __call__(self) -> None:
        with self.prepared.context():
            if not self.train:
                self.prepared.fn()
                return
            out = self.prepared.fn()
            if self.grad_out is None:
                self.grad_out = torch.randn_like(out)
            out.backward(self.grad_out)
        for t in self.grads:
            t.grad = None

    @contextlib.contextmanager
    def mode(self) -> Iterator[None]:
        with contextlib.nullcontext() if self.train else torch.inference_mode():
            yield


def time_interleaved(
    steps: dict[str, Step],
    *,
    device: torch.device,
    rounds: int,
    warmup: int,
    min_sample_s: float,
    budget_s: float = 0.0,
    max_rounds: int | None = None,
) -> dict[str, Stats | str]:
    """Time each step in interleaved rounds; a step that raises is reported by its error.

    At least ``rounds`` rounds; more -- up to ``max_rounds`` (default ``4 * rounds``) -- while
    they fit in ``budget_s`` seconds, so that cheap cells get tighter statistics for free.
    """
    result: dict[str, Stats | str] = {}
    inner: dict[str, int] = {}
    once_s: dict[str, float] = {}
    for name, step in steps.items():
        try:
            with step.mode():
                for _ in range(max(1, warmup)):
                    step()
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                once = time.perf_counter() - start
        except Exception as err:  # a peer that cannot take this cell is skipped, not fatal
            logger.debug("%s failed in warm-up", name, exc_info=True)
            result[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            continue
        inner[name] = min(MAX_INNER, max(1, math.ceil(min_sample_s / max(once, 1e-7))))
        once_s[name] = once

    names = list(inner)
    per_round = sum(inner[n] * once_s[n] for n in names)
    if names and budget_s > 0:
        cap = 4 * rounds if max_rounds is None else max_rounds
        rounds = max(rounds, min(cap, int(budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    shuffle = random.Random(ORDER_SEED)
    for _ in range(rounds):
        order = shuffle.sample(names, len(names))
        for name in order:
            if name in result:
                continue  # failed in an earlier round
            step, n = steps[name], inner[name]
            try:
                with step.mode():
                    _sync(device)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    for _ in range(n):
                        step()
                    _sync(device)
            except Exception as err:  # e.g. out of memory on a GPU in a later round
                result[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            samples[name].append((time.perf_counter() - start) / n)
            cpu[name].append((time.process_time() - cpu_start) / n)
    for name in names:
        if name not in result:
            result[name] = summarize(samples[name], inner[name], cpu[name])
    return result


def make_step(impl: Impl, cell: Cell, inputs: Inputs, device: torch.device) -> Step:
    """Build ``impl`` for ``cell`` and wrap it as a timed step."""
    prepared = impl.build(cell, inputs, device)
    return Step(prepared, inputs, impl.family, cell.mode == "train")


def gemm_gflops(
    dtype: torch.dtype, device: torch.device, *, n: int = 2048, rounds: int = 5
) -> float:
    """Median GFLOP/s of an ``n x n @ n x n`` matrix product in ``dtype`` (``2·n³`` FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    with torch.inference_mode():
        a @ b  # warm-up
        _sync(device)
        once = time.perf_counter()
        a @ b
        _sync(device)
        once = time.perf_counter() - once
        reps = max(1, math.ceil(0.05 / max(once, 1e-7)))
        times = []
        for _ in range(rounds):
            _sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            _sync(device)
            times.append((time.perf_counter() - start) / reps)
    return 2 * n**3 / statistics.median(times) / 1e9


# --- memory -----------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_extra_memory(step: Step, device: torch.device) -> int:
    """Peak extra bytes of one call of ``step`` (already warmed up), see the module docstring.

    On CPU this must run in a process of its own (the high-water mark is the whole process's).
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with step.mode():
            step()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    _release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS (Linux >= 4.0)
    before = _proc_status_kib("VmRSS")
    with step.mode():
        step()
    return (_proc_status_kib("VmHWM") - before) * 1024


def cell_to_dict(cell: Cell) -> dict[str, object]:
    """A JSON-ready form of ``cell``."""
    d = asdict(cell)
    d["tags"] = list(cell.tags)
    return d


def cell_from_dict(d: dict[str, object]) -> Cell:
    """The inverse of :func:`cell_to_dict`."""
    shape = d["shape"]
    if not isinstance(shape, dict):
        raise TypeError(f"cell shape must be a dict, got {type(shape).__name__}")
    tags = d.get("tags", ())
    return Cell(
        shape=Shape(**shape),
        dtype=str(d["dtype"]),
        mode=str(d["mode"]),
        masked=bool(d["masked"]),
        group=str(d.get("group", "")),
        tags=tuple(tags) if isinstance(tags, (list, tuple)) else (),
    )


def memory_in_subprocess(
    cell: Cell, impl_names: list[str], *, threads: int, timeout_s: float = 600.0
) -> dict[str, int | str]:
    """Peak extra memory of each implementation in ``cell``, measured in a fresh CPU process.

    Returns bytes per implementation, or a string saying why there is no figure.
    """
    if not impl_names:
        return {}
    spec = {"cell": cell_to_dict(cell), "impls": impl_names, "threads": threads}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "xmodal.bench.memory"],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {name: "memory child timed out" for name in impl_names}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]
        return {name: f"memory child failed: {tail}" for name in impl_names}
    out: dict[str, int | str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def memory_child(spec: dict[str, object]) -> dict[str, int | str]:
    """The child's side of :func:`memory_in_subprocess`: measure each implementation in turn."""
    threads = spec.get("threads")
    if isinstance(threads, int):
        torch.set_num_threads(threads)
    cell_spec = spec["cell"]
    names = spec["impls"]
    if not isinstance(cell_spec, dict) or not isinstance(names, list):
        raise TypeError("memory spec must hold a 'cell' dict and an 'impls' list")
    cell = cell_from_dict(cell_spec)
    device = torch.device("cpu")
    inputs = make_inputs(cell, device)
    result: dict[str, int | str] = {}
    for impl in select_impls(tuple(names)):
        try:
            step = make_step(impl, cell, inputs, device)
            with step.mode():
                step()  # warm-up: one-off allocations (thread pools, kernel caches) happen here
            result[impl.name] = peak_extra_memory(step, device)
        except Exception as err:
            result[impl.name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return result
