export TWELL_COMMIT=$1 PYTHONPATH=src
python -m pytest -q tests/test_infer_gpu.py tests/test_hf_gpu.py -p no:cacheprovider 2>&1 | tail -4
python -m pytest -q tests/test_ffn_infer.py -k "decode" -p no:cacheprovider 2>&1 | tail -2
python benchmarks/dev_infer.py --decode-sweep --decode-ms 1 2 4 8 16 32 64 --reps 50 --out $OUT/decode.jsonl 2>&1 | grep -v -i warn
