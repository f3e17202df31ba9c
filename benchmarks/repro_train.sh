#!/usr/bin/env bash
# The dense-vs-sparse reproduction of docs/training.md in one device call: the 29.9 M-parameter model
# trained twice on the same tokens (dense: L1 0 and Hugging Face's own ReLU MLP; sparse: L1), then
# `twell stats` on the saved sparse model, then a summary; everything comes back packed under $OUT.
#
# Usage (repository root): OUT=/some/dir bash benchmarks/repro_train.sh
#   STEPS (800: 800 x 65,536 = 52.4 M tokens), L1 (1e-3), DENSE_TIMEOUT (250 s), SPARSE_TIMEOUT (290 s),
#   STATS_TIMEOUT (40 s), BUDGET (570 s, for a 600 s call: the sparse run's limit is cut to what is left
#   of it after the dense run, less stats and 10 s of summary and packing), DATA (runs/data/large.jsonl.gz), WORK (/tmp/twell-repro: run dirs, the saved model and
#   the tokenized-data cache), PYTHON (python), REPRO_TINY=1 (CPU smoke test: a tiny model on the
#   embedded corpus, a few steps).
#
# $OUT gets at most 7 files: repro.log (this script's whole output, written as it goes),
# repro-dense-metrics.jsonl and repro-sparse-metrics.jsonl (copied every 5 s while the runs go, so a
# call killed mid-run still returns them), repro-dense.tar.gz and repro-sparse.tar.gz (metrics.jsonl,
# run.json, train.log, loss.png/sparsity.png when the run finished, the sparse model's config.json),
# stats.tar.gz (twell stats: report.txt, stats.json, PNGs), summary.md (benchmarks/repro_summary.py).
#
# Tokenization: both runs read the same `datasets` cache under $WORK/hf-datasets (build_data gives
# the map an explicit fingerprint), so only the first run tokenizes: 34 s cold vs 3.6 s warm for
# large.jsonl.gz (32.0 M training tokens) on 2 shared CPU cores here.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true COLUMNS=${COLUMNS:-160}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:?set OUT to the output directory}
WORK=${WORK:-/tmp/twell-repro}
PY=${PYTHON:-$(command -v python || command -v python3)}
STEPS=${STEPS:-800}
L1=${L1:-1e-3}
DENSE_TIMEOUT=${DENSE_TIMEOUT:-250}
SPARSE_TIMEOUT=${SPARSE_TIMEOUT:-290}
STATS_TIMEOUT=${STATS_TIMEOUT:-40}
BUDGET=${BUDGET:-570}
DATA=${DATA:-runs/data/large.jsonl.gz}
T0=$(date +%s)
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/repro-dense" "$WORK/repro-sparse" "$WORK/stats"
export HF_HOME="$WORK/hf" HF_DATASETS_CACHE="$WORK/hf-datasets" MPLCONFIGDIR="$WORK/mpl"
exec > >(tee -a "$OUT/repro.log") 2>&1
TEE_PID=$!

echo "# twell repro: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo "${TWELL_COMMIT:-unknown}")"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "# $(nproc) CPU cores"
# `datasets` (and its dill, multiprocess) is not in the device image: install the wheels carried with the data.
if ! "$PY" -c "import datasets" 2>/dev/null; then
  echo "# installing datasets from $(dirname "$DATA")/wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
    "$(dirname "$DATA")"/wheels/*.whl || echo "!! pip install of the datasets wheels failed"
  export PYTHONPATH="src:$WORK/site"
  "$PY" -c "import datasets" || echo "!! datasets does not import: both training runs will fail"
fi
"$PY" -c "
import torch, triton, transformers, accelerate, datasets
print('# python', __import__('platform').python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__,
      'datasets', datasets.__version__)
print('# gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"

if [ "${REPRO_TINY:-0}" = 1 ]; then
  # ~1 M params, 64-token blocks: every step of the pipeline in a minute or two of CPU
  COMMON="--hidden-size 64 --intermediate-size 176 --num-layers 2 --num-heads 2 --seq-len 64 \
    --micro-batch-size 4 --grad-accum 2 --max-steps ${STEPS_TINY:-30} --warmup-steps 3 --eval-every 10 \
    --val-blocks 8 --dead-window-tokens 2048 --dataset embedded --val-fraction 0.02 --cpu \
    --precision no --no-progress --log-every 10 --trackers none"
  STATS_DATA_ARGS="--seq-len 64 --batch 4 --max-tokens 2048 --union-tokens 256 --tile 64 --slots 16"
  STATS_SRC=$("$PY" -c "from twell.data import corpus_path; print(corpus_path())")
else
  COMMON="--hidden-size 512 --intermediate-size 1408 --num-layers 8 --num-heads 8 --seq-len 512 \
    --micro-batch-size 64 --grad-accum 2 --max-steps $STEPS --warmup-steps 80 --eval-every 100 \
    --val-blocks 256 --dead-window-tokens 1048576 --dataset $DATA --val-fraction 0.005 \
    --precision bf16 --no-progress --log-every 50 --trackers none"
  STATS_DATA_ARGS="--seq-len 512 --batch 32 --max-tokens 262144"
  STATS_SRC=$DATA
fi

RUNS=${RUNS:-dense sparse}
# Copies each run's metrics.jsonl into $OUT every 5 s (a call killed at its limit still returns them).
sync_metrics() {
  for r in $RUNS; do
    f="$WORK/repro-$r/metrics.jsonl"
    [ -f "$f" ] && cp "$f" "$OUT/.repro-$r.tmp" && mv "$OUT/.repro-$r.tmp" "$OUT/repro-$r-metrics.jsonl"
  done
  return 0
}
( while sleep 5; do sync_metrics; done ) >/dev/null 2>&1 &
SYNC_PID=$!

# run NAME LIMIT ARGS...: one training run under `timeout`, its own log and run.json (exit code, wall time)
run() {
  local name=$1 limit=$2
  shift 2
  local dir="$WORK/repro-$name" t=$(date +%s)
  mkdir -p "$dir"
  echo "## $name: limit ${limit}s, $(date -u +%T)"
  timeout --kill-after=10 "$limit" "$PY" -m twell.cli train $COMMON --output-dir "$dir" "$@" 2>&1 |
    tee "$dir/train.log"
  local rc=${PIPESTATUS[0]} wall=$(($(date +%s) - t))
  echo "{\"exit_code\": $rc, \"wall_s\": $wall, \"limit_s\": $limit, \"timed_out\": $([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo true || echo false)}" >"$dir/run.json"
  echo "## $name: exit $rc after ${wall}s"
}

# RUNS=sparse reruns only the sparse model (e.g. with another L1) against an earlier dense run dir
# given as DENSE_DIR (its metrics.jsonl and run.json)
RUNS=${RUNS:-dense sparse}
if [[ " $RUNS " == *" dense "* ]]; then
  run dense "$DENSE_TIMEOUT" --l1-coeff 0 --no-sparse-mlp --no-save-final
elif [ -n "${DENSE_DIR:-}" ]; then
  mkdir -p "$WORK/repro-dense" && cp "$DENSE_DIR"/metrics.jsonl "$DENSE_DIR"/run.json "$WORK/repro-dense/"
fi
left=$((BUDGET - ($(date +%s) - T0) - STATS_TIMEOUT - 10))
[ "$left" -lt 30 ] && left=30 # the sparse run gets at least 30 s, even at the cost of stats
limit=$((left < SPARSE_TIMEOUT ? left : SPARSE_TIMEOUT))
run sparse "$limit" --l1-coeff "$L1"
sync_metrics

# twell stats on the saved sparse model, over the start of the training text (seen in training).
mkdir -p "$WORK/stats"
if [ -f "$WORK/repro-sparse/final/config.json" ]; then
  case "$STATS_SRC" in
    *.gz) zcat "$STATS_SRC" | head -n 4000 >"$WORK/stats/text.jsonl" ;;
    *) cp "$STATS_SRC" "$WORK/stats/text.jsonl" ;;
  esac
  echo "## stats: limit ${STATS_TIMEOUT}s, $(date -u +%T)"
  timeout --kill-after=5 "$STATS_TIMEOUT" "$PY" -m twell.cli stats "$WORK/repro-sparse/final" \
    --data "$WORK/stats/text.jsonl" $STATS_DATA_ARGS --out "$WORK/stats/out" 2>&1 | tee "$WORK/stats/stats.log"
  echo "## stats: exit ${PIPESTATUS[0]}"
else
  echo "!! no saved sparse model (run cut short?): twell stats skipped" | tee "$WORK/stats/stats.log"
fi

"$PY" benchmarks/repro_summary.py "$WORK/repro-dense" "$WORK/repro-sparse" \
  --plot "$WORK/repro-sparse/compare.png" | tee "$OUT/summary.md"

kill "$SYNC_PID" 2>/dev/null
wait "$SYNC_PID" 2>/dev/null
sync_metrics
# pack: the model weights stay behind (fp32 29.9 M params = 120 MB, over the 16 MB a file may bring back)
for r in $RUNS; do
  d="$WORK/repro-$r"
  [ -d "$d" ] || continue
  files=$(cd "$d" && ls metrics.jsonl run.json train.log ./*.png final/config.json 2>/dev/null)
  tar -czf "$OUT/repro-$r.tar.gz" -C "$d" $files
done
tar -czf "$OUT/stats.tar.gz" --exclude stats/text.jsonl -C "$WORK" stats
echo "# done in $(($(date +%s) - T0))s: $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # let tee write the last lines of repro.log
