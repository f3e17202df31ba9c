#!/usr/bin/env bash
# One device call: the packing-kernel and HF GPU tests, logs under $OUT.
# Usage on the device machine: bash benchmarks/gpu_suite.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{
  echo "# $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  python -c "import torch, triton; print('# torch', torch.__version__, 'triton', triton.__version__)"
  echo "# commit ${TWELL_COMMIT:-unknown}, $(date -u +%FT%TZ)"
} > "$OUT/gpu-tests-suite.log"
timeout ${SUITE_TIMEOUT:-240} python -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee -a "$OUT/gpu-tests-suite.log" | tail -5
