#!/usr/bin/env bash
# Run the cuda-marked tests on a lent GPU machine (not CI: CI has no GPU). Writes logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep -E "Model name"; python3 --version; } > "$OUT/machine.txt" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -c "import torch, cupy, tqindex.native as n; print('torch', torch.__version__, 'cupy', cupy.__version__, 'simd', n.simd())" | tee -a "$OUT/machine.txt"
cat "$OUT/machine.txt"
PYTHONUNBUFFERED=1 timeout "${1:-480}" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -x 2>&1 | tee "$OUT/cuda.log" | tail -25
PYTHONUNBUFFERED=1 timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_host.py tests/test_index.py -k "gpu or cuda or host" 2>&1 | tail -3
