#!/usr/bin/env bash
# One replay iteration on a GPU: the local evaluator on the driver's GPU against the Dask
# evaluator with one LocalCluster worker process on the same GPU (the worker sees CUDA and moves
# its network and shard there; results come back as CPU NumPy arrays), for 512, 4096 and 32768
# samples, hidden 200,1000,1000,200, float64 then float32. Sized to a few minutes on one H100.
#
#   bash benchmarks/gpu_dask_bench.sh [OUT_DIR]        # from the repository root
#
# Needs a Python (PYTHON, default python3) with a CUDA build of torch and dask[distributed];
# the package is used from this checkout (PYTHONPATH). Writes OUT_DIR/gpu_dask_<dtype>.{txt,json}
# and OUT_DIR/gpu.txt (OUT_DIR defaults to $OUT, else benchmarks/out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-benchmarks/out}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PYEOF' | tee "$OUT_DIR/gpu.txt"
import sys
import distributed
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_dask_bench: torch sees no CUDA device (a CPU build of torch, or no GPU)")
print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"distributed {distributed.__version__}; python {sys.version.split()[0]}")
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT_DIR/gpu.txt" 2>/dev/null || true

for dtype in float64 float32; do
    timeout 240 "$PY" benchmarks/bench_dask.py --device cuda --workers 1 --dtype "$dtype" \
        --sizes 512 4096 32768 --repeats 10 --warmup 3 --json "$OUT_DIR/gpu_dask_$dtype.json" \
        2>&1 | grep -v ' INFO ' | tee "$OUT_DIR/gpu_dask_$dtype.txt"
done
