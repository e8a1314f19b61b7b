#!/usr/bin/env bash
# The GPU benchmark of issue 8: the bf16 part of the grid plus H100-typical shapes (head width
# 128 and 64, t and i up to 8192), xmodal against SDPA's flash / cuDNN / efficient backends
# called directly and against FlashAttention-3's H100 SXM figures (bf16 fwd, non-causal:
# ~497 TFLOP/s at head width 64, ~648 at 128).
#
#   bash benchmarks/gpu.sh            # results in ./bench-gpu/ (or in $OUT when set)
#
# Needs only Python with a CUDA build of torch (the repository's src/ goes on PYTHONPATH; no
# install step, no network). transformers / flamingo-pytorch / matplotlib are used when present
# and skipped with a note when not. Without a CUDA device it prints a note and exits 0.
# Budget: the grid is capped at BENCH_TIMEOUT seconds (default 420), the decode step at
# DECODE_TIMEOUT (default 90): under 9 minutes in all.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu.sh: '$PY' cannot import torch; set PYTHON to an interpreter that has it. Skipped."
    exit 0
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device visible to torch $("$PY" -c 'import torch; print(torch.__version__)');" \
        "the GPU benchmark needs one. Skipped (run 'xmodal bench' for the CPU grid)."
    exit 0
fi
if ! "$PY" -c "import xmodal" 2>/dev/null; then
    echo "gpu.sh: cannot import xmodal from $PWD/src:"
    "$PY" -c "import xmodal" || true
    exit 1
fi

out="${OUT:-$PWD/bench-gpu}"
mkdir -p "$out"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader || true
    fi
} | tee "$out/gpu-info.txt"

status=0
timeout "${BENCH_TIMEOUT:-420}" "$PY" -m xmodal.bench --preset gpu --device cuda --no-decode \
    --json "$out/gpu.json" --markdown "$out/gpu.md" --plot "$out/gpu.png" \
    2> >(tee "$out/gpu-progress.log" >&2) | tee "$out/gpu-table.txt" || status=$?
if [ "$status" -ne 0 ]; then
    echo "gpu.sh: the benchmark exited with status $status (124 = timed out after ${BENCH_TIMEOUT:-420} s)"
fi
# The decode step with and without the ImageKV cache, on its own short budget.
if [ -f benchmarks/bench_decode.py ]; then
    timeout "${DECODE_TIMEOUT:-90}" "$PY" benchmarks/bench_decode.py --device cuda \
        --json "$out/decode.json" | tee "$out/decode.txt" \
        || echo "gpu.sh: bench_decode.py did not finish (status $?)"
fi
echo "gpu.sh: results in $out (gpu.json, gpu.md, gpu-table.txt, gpu.png, decode.json)"
exit "$status"
