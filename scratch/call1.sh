export TWELL_COMMIT=$1 PYTHONPATH=src
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python -m pytest -q -x tests/test_infer_gpu.py -k "lean or atomic or gate_pack" -p no:cacheprovider 2>&1 | tail -6
python -m pytest -q tests/test_ffn_infer.py -k "atomic or decode" -p no:cacheprovider 2>&1 | tail -3
python benchmarks/dev_infer.py --decode-sweep --decode-ms 1 2 --reps 50 --out $OUT/decode.jsonl 2>&1 | grep -v -i warn
python benchmarks/dev_infer.py --gate-sweep --out $OUT/gate.jsonl 2>&1 | grep -v -i warn
