"""Turn a benchmark result into a terminal table, Markdown, target checks and a plot.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width.

The input is the dictionary :func:`xmodal.bench.runner.run` returns (and ``--json`` writes), so
every function here also works on a saved JSON file. The targets checked are those of issues 2
and 8; "no slower" is judged against the run-to-run noise the table shows: ``a`` is slower than
``b`` only when ``a``'s first quartile lies above ``b``'s third.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = [
    "FA3_H100_BF16_FWD_TFLOPS",
    "check_targets",
    "format_checks",
    "format_header",
    "format_reference",
    "format_summary",
    "format_table",
    "plot",
    "to_markdown",
]

Row = dict[str, Any]

# attention cores of at least this many FLOPs count as "large" for the GEMM-fraction target
LARGE_CORE_FLOPS = 4e9
CORE_TARGET = {"fp32": 0.60, "bf16": 0.40}
# FlashAttention-3 (Shah et al. 2024), H100 SXM5, bf16 forward, non-causal, hidden width 2048:
# about 497 TFLOP/s at head width 64 and 648 at head width 128 (the paper's figures).
FA3_H100_BF16_FWD_TFLOPS = {64: 497.0, 128: 648.0}


def _fmt_ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _fmt_mb(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def format_header(result: dict[str, Any]) -> str:
    """The lines that name the machine, software, threads, date and GEMM reference."""
    m = result["meta"]
    lines = [
        f"date: {m['date_utc']}   command: {m['command']}",
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs; {', '.join(m['cpu_flags'])})",
    ]
    if "gpu" in m:
        lines.append(f"gpu: {m['gpu']} (CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')})")
    peers = ", ".join(f"{k} {v or 'not installed'}" for k, v in m["peers"].items())
    lines.append(f"torch {m['torch']}, python {m['python']}, xmodal {m['xmodal']}; {peers}")
    lines.append(
        f"threads: {m['threads']} intra-op, {m['interop_threads']} inter-op; device {m['device']}"
        f"; >= {m['rounds']} interleaved rounds (more while within {m.get('budget_s', 0):g} s"
        f" per cell) after {m['warmup']} warm-up call(s) and a calibration call,"
        f" samples of >= {m['min_sample_s'] * 1e3:g} ms"
    )
    if "malloc" in m:
        lines.append(f"malloc: {m['malloc']}")
    gemm = ", ".join(
        f"{d} {g['reference']:.0f} GFLOP/s (start {g['start']:.0f}, end {g['end']:.0f})"
        for d, g in m["gemm_gflops"].items()
    )
    lines.append(f"GEMM reference (n={next(iter(m['gemm_gflops'].values()))['n']}): {gemm}")
    if "load_average_start" in m:
        lines.append(
            f"load average: {m['load_average_start']} at start, "
            f"{m.get('load_average_end', '?')} at end"
        )
    return "\n".join(lines)


_COLUMNS = (
    ("impl", "<"),
    ("median ms", ">"),
    ("IQR ms", ">"),
    ("min-max ms", ">"),
    ("CPU ms", ">"),
    ("x notebook", ">"),
    ("GFLOP/s", ">"),
    ("% GEMM", ">"),
    ("peak MB", ">"),
    ("note", "<"),
)


def _cells(result: dict[str, Any]) -> list[tuple[str, list[Row]]]:
    by_cell: dict[str, list[Row]] = defaultdict(list)
    for row in result["rows"]:
        by_cell[row["cell"]].append(row)
    return list(by_cell.items())


def _row_fields(row: Row) -> list[str]:
    if row["status"] != "ok":
        return [row["impl"], "", "", "", "", "", "", "", "", f"skipped: {row.get('note', '')}"]
    speed, cpu_speed = row.get("speedup_vs_notebook"), row.get("cpu_speedup_vs_notebook")
    cpu = row.get("cpu_median_ms")
    return [
        row["impl"],
        _fmt_ms(row["median_ms"]),
        f"{_fmt_ms(row['q1_ms'])}-{_fmt_ms(row['q3_ms'])}",
        f"{_fmt_ms(row['min_ms'])}-{_fmt_ms(row['max_ms'])}",
        "" if cpu is None else _fmt_ms(cpu),
        ("" if speed is None else f"{speed:.2f}")
        + ("" if cpu_speed is None else f" ({cpu_speed:.2f})"),
        f"{row['gflops']:.1f}",
        f"{100 * row['frac_gemm']:.0f}",
        _fmt_mb(row.get("peak_extra_bytes")),
        row.get("memory_note", ""),
    ]


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table per cell, aligned for a terminal."""
    out: list[str] = []
    for label, rows in _cells(result):
        fields = [[name for name, _ in _COLUMNS], *(_row_fields(r) for r in rows)]
        widths = [max(len(f[c]) for f in fields) for c in range(len(_COLUMNS) - 1)]
        timed = [len(r["samples_ms"]) for r in rows if r["status"] == "ok"]
        out.append(f"\n== {label}" + (f"   ({max(timed)} rounds)" if timed else ""))
        for f in fields:
            cols = [
                f[c].ljust(widths[c]) if align == "<" else f[c].rjust(widths[c])
                for c, (_, align) in enumerate(_COLUMNS[:-1])
            ]
            out.append("  ".join(cols) + ("  " + f[-1] if f[-1] else ""))
    return "\n".join(out).lstrip("\n")


def format_summary(result: dict[str, Any]) -> str:
    """One Markdown line per cell: xmodal against the notebook, MHA and the fastest peer."""
    out = [
        "| cell | xmodal ms | notebook ms (x) | torch-mha ms | fastest other layer, ms "
        "| core % GEMM | xmodal MB | notebook MB |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for label, rows in _cells(result):
        ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
        fused = ok.get("xmodal")
        if fused is None:
            continue
        nb, mha, core = ok.get("notebook"), ok.get("torch-mha"), ok.get("core:xmodal")
        others = [
            r for r in ok.values() if r["family"] == "module" and not r["impl"].startswith("xmodal")
        ]
        best = min(others, key=lambda r: r["median_ms"]) if others else None
        cells = [
            label,
            _fmt_ms(fused["median_ms"]),
            ""
            if nb is None
            else f"{_fmt_ms(nb['median_ms'])} ({nb['median_ms'] / fused['median_ms']:.2f}x)",
            "" if mha is None else _fmt_ms(mha["median_ms"]),
            "" if best is None else f"{best['impl']} {_fmt_ms(best['median_ms'])}",
            "" if core is None else f"{100 * core['frac_gemm']:.0f}",
            _fmt_mb(fused.get("peak_extra_bytes")),
            "" if nb is None else _fmt_mb(nb.get("peak_extra_bytes")),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def to_markdown(result: dict[str, Any]) -> str:
    """The header, a summary, one Markdown table per cell, the target checks, decode results."""
    out = ["```", format_header(result), "```", "", format_summary(result), ""]
    for label, rows in _cells(result):
        timed = [len(r["samples_ms"]) for r in rows if r["status"] == "ok"]
        out.append(f"**{label}**" + (f" ({max(timed)} rounds)" if timed else "") + "\n")
        out.append("| " + " | ".join(name for name, _ in _COLUMNS) + " |")
        out.append("|" + "|".join("---" if a == "<" else "---:" for _, a in _COLUMNS) + "|")
        for row in rows:
            out.append("| " + " | ".join(_row_fields(row)) + " |")
        out.append("")
    out += ["**Targets**", "", "```", format_checks(check_targets(result)), "```"]
    if "gpu" in result["meta"]:
        out += ["", "**Attention cores against FlashAttention-3's H100 figures**", "", "```"]
        out += [format_reference(result), "```"]
    decode = result.get("decode")
    if isinstance(decode, dict):
        out += ["", "**Decode step**", ""]
        if "skipped" in decode:
            out.append(f"skipped: {decode['skipped']}")
        if decode.get("stdout"):
            out += ["```", str(decode["stdout"]).rstrip(), "```"]
    return "\n".join(out) + "\n"


def format_reference(result: dict[str, Any]) -> str:
    """Attention cores on a GPU against FlashAttention-3's H100 SXM bf16 forward figures.

    Unmasked bf16 inference cells with head width 64 or 128 only; the reference is for an
    H100 SXM5 and other GPUs (H100 PCIe, H200, A100) should be read with that in mind.
    """
    lines = [f"GPU: {result['meta'].get('gpu', 'none')}; FA3 reference (H100 SXM, bf16 fwd):"
             f" {FA3_H100_BF16_FWD_TFLOPS} TFLOP/s by head width"]  # fmt: skip
    for label, rows in _cells(result):
        first = rows[0]
        ref = FA3_H100_BF16_FWD_TFLOPS.get(first["shape"]["head_dim"])
        if ref is None or first["dtype"] != "bf16" or first["mode"] != "infer" or first["masked"]:
            continue
        got = [
            f"{r['impl'].removeprefix('core:')} {r['gflops'] / 1e3:.0f} "
            f"({100 * r['gflops'] / 1e3 / ref:.0f}%)"
            for r in rows
            if r["family"] == "core" and r["status"] == "ok"
        ]
        if got:
            lines.append(f"{label}: " + ", ".join(got))
    return "\n".join(lines)


def _cpu_ratio(slow: Row, fast: Row) -> str:
    """``"; CPU time 1.35x"`` when both rows have CPU-time medians, else ``""``."""
    a, b = slow.get("cpu_median_ms"), fast.get("cpu_median_ms")
    return f"; CPU time {a / b:.2f}x" if a and b else ""


def _slower(a: Row, b: Row) -> bool:
    """``a`` is slower than ``b`` beyond the noise: ``a``'s Q1 above ``b``'s Q3."""
    return bool(a["q1_ms"] > b["q3_ms"])


def check_targets(result: dict[str, Any]) -> list[Row]:
    """Each target of issues 2 and 8 that this result can speak to, with its figures."""
    checks: list[Row] = []

    def add(target: str, cell: str, passed: bool, detail: str) -> None:
        checks.append({"target": target, "cell": cell, "pass": passed, "detail": detail})

    for label, rows in _cells(result):
        ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
        first = rows[0]
        tags = first.get("tags", [])
        fused, notebook, mha = ok.get("xmodal"), ok.get("notebook"), ok.get("torch-mha")
        issue2 = "issue2-notebook" in tags or "issue2-large" in tags
        if fused and notebook and issue2 and first["mode"] == "infer":
            large = "issue2-large" in tags
            speed = notebook["median_ms"] / fused["median_ms"]
            cpu = _cpu_ratio(notebook, fused)
            for need, issue in ((2.0, "issue 2"), (3.0, "issue 8")) if large else ((1.4, "2/8"),):
                add(
                    f"{issue}: xmodal >= {need}x notebook",
                    label,
                    speed >= need,
                    f"{speed:.2f}x ({notebook['median_ms']:.3g} / {fused['median_ms']:.3g} ms)"
                    + cpu,
                )
            if large and "peak_extra_bytes" in fused and "peak_extra_bytes" in notebook:
                frac = fused["peak_extra_bytes"] / max(1, notebook["peak_extra_bytes"])
                add(
                    "issue 2: xmodal peak extra memory <= 10% of notebook's",
                    label,
                    frac <= 0.10,
                    f"{100 * frac:.1f}% ({_fmt_mb(fused['peak_extra_bytes'])} / "
                    f"{_fmt_mb(notebook['peak_extra_bytes'])} MB)",
                )
            if mha:
                add(
                    "issue 2: xmodal no slower than torch-mha(need_weights=False)",
                    label,
                    not _slower(fused, mha),
                    f"{fused['median_ms']:.3g} vs {mha['median_ms']:.3g} ms "
                    f"(IQR {fused['q1_ms']:.3g}-{fused['q3_ms']:.3g} vs "
                    f"{mha['q1_ms']:.3g}-{mha['q3_ms']:.3g})" + _cpu_ratio(mha, fused),
                )
        if fused:
            # Peers without biases are compared with xmodal without biases, when it ran.
            ours = {True: fused, False: ok.get("xmodal-nobias", fused)}
            peers = [
                r
                for r in ok.values()
                if r["family"] == "module" and not r["impl"].startswith("xmodal")
            ]
            faster = [
                f"{p['impl']} ({ours[p.get('bias', True)]['impl']})"
                for p in peers
                if _slower(ours[p.get("bias", True)], p)
            ]
            add(
                "issue 8: xmodal at least as fast as every peer (within noise)",
                label,
                not faster,
                "slower than " + ", ".join(faster) if faster else f"{len(peers)} peers",
            )
        core = ok.get("core:xmodal")
        if core and core["flops"] / (3 if first["mode"] == "train" else 1) >= LARGE_CORE_FLOPS:
            need = CORE_TARGET[first["dtype"]]
            add(
                f"issue 8: attention core >= {100 * need:.0f}% of {first['dtype']} GEMM",
                label,
                core["frac_gemm"] >= need,
                f"{100 * core['frac_gemm']:.0f}% ({core['gflops']:.0f} GFLOP/s)",
            )
        if fused and "peak_extra_bytes" in fused and first["mode"] == "infer":
            s = first["shape"]
            size = 4 if first["dtype"] == "fp32" else 2
            scores = s["batch"] * s["num_heads"] * s["text_len"] * s["image_len"] * size
            hd = s["num_heads"] * s["head_dim"]
            # what the fused path must hold, O(t + i): q and output (t rows), k and v (i rows);
            # 2x leaves room for the fp32 accumulators a bf16 kernel keeps, also O(t)
            linear = s["batch"] * (s["text_len"] * (hd + s["text_dim"]) + 2 * s["image_len"] * hd)
            linear *= size
            if scores >= 64 * 2**20:
                frac = fused["peak_extra_bytes"] / linear
                add(
                    "issue 8: fused memory grows with t+i, not t*i (<= 2x its q, k, v, output)",
                    label,
                    frac <= 2.0,
                    f"{_fmt_mb(fused['peak_extra_bytes'])} MB = {frac:.2f}x the "
                    f"{_fmt_mb(linear)} MB of q, k, v and output; one (b, h, t, i) score tensor "
                    f"would be {_fmt_mb(scores)} MB",
                )
    return checks


def format_checks(checks: list[Row]) -> str:
    """One line per check: PASS/MISS, the target, the cell and the figures."""
    if not checks:
        return "(no target applies to these cells)"
    return "\n".join(
        f"{'PASS' if c['pass'] else 'MISS'}  {c['target']}  [{c['cell']}]  {c['detail']}"
        for c in checks
    )


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Time and peak extra memory against image length, log scale, one line per implementation.

    One column per series of cells that differ only in image length (same group, dtype, mode
    and mask). Needs matplotlib (the ``viz`` extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, str, bool], list[Row]] = defaultdict(list)
    for row in result["rows"]:
        if row["status"] == "ok" and row["family"] != "ref":
            series[(row["group"], row["dtype"], row["mode"], row["masked"])].append(row)
    sweeps = {
        k: rows for k, rows in series.items() if len({r["shape"]["image_len"] for r in rows}) >= 2
    }
    if not sweeps:  # nothing varies in image length: one bar chart of every cell
        return _bar_plot(result, path, plt)
    fig, axes = plt.subplots(
        2, len(sweeps), figsize=(5 * len(sweeps) + 2.5, 8), squeeze=False, sharex="col"
    )
    names = list(dict.fromkeys(r["impl"] for rows in sweeps.values() for r in rows))
    palette = plt.get_cmap("tab20")
    colour = {name: palette(i % 20) for i, name in enumerate(names)}
    for col, (key, rows) in enumerate(sweeps.items()):
        group, dtype, mode, masked = key
        shape = rows[0]["shape"]
        by_impl: dict[str, list[Row]] = defaultdict(list)
        for r in rows:
            by_impl[r["impl"]].append(r)
        for impl, impl_rows in by_impl.items():
            impl_rows.sort(key=lambda r: r["shape"]["image_len"])
            xs = [r["shape"]["image_len"] for r in impl_rows]
            style = "--" if impl.startswith("core:") else "-"
            width = 2.5 if impl in ("xmodal", "core:xmodal") else 1.2
            axes[0][col].plot(
                xs,
                [r["median_ms"] for r in impl_rows],
                style,
                marker="o",
                lw=width,
                color=colour[impl],
                label=impl,
            )
            mem = [(x, r["peak_extra_bytes"]) for x, r in zip(xs, impl_rows, strict=True)
                   if r.get("peak_extra_bytes")]  # fmt: skip
            if mem:
                axes[1][col].plot(
                    [m[0] for m in mem],
                    [m[1] / 2**20 for m in mem],
                    style,
                    marker="o",
                    lw=width,
                    color=colour[impl],
                )
        title = (
            f"{group}: b{shape['batch']} t{shape['text_len']} D{shape['text_dim']} "
            f"h{shape['num_heads']} d{shape['head_dim']}\n{dtype} {mode}"
            f"{' masked' if masked else ''}"
        )
        axes[0][col].set_title(title, fontsize=9)
        for row_ax, ylabel in ((axes[0][col], "median time (ms)"), (axes[1][col], "peak extra MB")):
            row_ax.set_xscale("log")
            row_ax.set_yscale("log")
            row_ax.set_ylabel(ylabel)
            row_ax.grid(True, which="both", alpha=0.3)
        axes[1][col].set_xlabel("image tokens i")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    fig.legend(
        [handles[n] for n in names if n in handles],
        [n for n in names if n in handles],
        loc="center right",
        fontsize=8,
    )
    fig.suptitle(_title(result), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 0.95))
    return _save(fig, path, plt, layout=False)


def _title(result: dict[str, Any]) -> str:
    m = result["meta"]
    return (
        f"xmodal bench: {m.get('gpu') or m['cpu']}\ntorch {m['torch']}, {m['threads']} threads, "
        f"{m['date_utc']}"
    )


def _save(fig: Any, path: str | Path, plt: Any, *, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bar_plot(result: dict[str, Any], path: str | Path, plt: Any) -> Path:
    """Median time per implementation, one panel per cell (for grids without a sweep)."""
    cells = [
        (label, [r for r in rows if r["status"] == "ok" and r["family"] != "ref"])
        for label, rows in _cells(result)
    ]
    cells = [(label, rows) for label, rows in cells if rows]
    fig, axes = plt.subplots(len(cells), 1, figsize=(8, 0.35 * sum(len(r) for _, r in cells) + 2))
    for ax, (label, rows) in zip(getattr(axes, "flat", [axes]), cells, strict=True):
        ax.barh([r["impl"] for r in rows], [r["median_ms"] for r in rows])
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("median time (ms)")
    fig.suptitle(_title(result), fontsize=10)
    return _save(fig, path, plt)
