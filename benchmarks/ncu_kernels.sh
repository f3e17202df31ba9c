#!/usr/bin/env bash
# Nsight Compute speed-of-light and memory sections of the inference kernels and the dense cuBLAS
# FFN (paper shape, bf16, ~30 active units per token), one call each per M: achieved DRAM and L2
# throughput and SM / tensor pipe use per kernel (issue 4 asks for them where a target is missed).
# Usage on a CUDA machine: OUT=dir bash benchmarks/ncu_kernels.sh [M ...]
set -u
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ncu}
mkdir -p "$OUT"
NCU=${NCU:-ncu}
"$NCU" --profile-from-start off --target-processes all \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --csv --page details python benchmarks/ncu_target.py "$@" > "$OUT/ncu-details.csv" 2> "$OUT/ncu.log"
echo "ncu exit $? -> $OUT/ncu-details.csv"
python - "$OUT/ncu-details.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"')))
want = ("Duration", "DRAM Throughput", "L2 Cache Throughput", "Compute (SM) Throughput", "Memory Throughput")
seen = {}
for r in rows:
    if r.get("Metric Name") in want:
        k = (r["ID"], r["Kernel Name"][:40])
        seen.setdefault(k, {})[r["Metric Name"]] = f'{r["Metric Value"]} {r["Metric Unit"]}'
for (i, name), m in seen.items():
    print(i, name, "|", "; ".join(f"{k}: {m.get(k, '-')}" for k in want))
PY
