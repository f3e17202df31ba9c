export TWELL_COMMIT=$1 PYTHONPATH=src
python -m pytest -q tests/test_infer_gpu.py -k "atomic or paths_bf16 or cuda_graph or patterns" -p no:cacheprovider 2>&1 | tail -2
python -m pytest -q tests/test_ffn_infer.py -k "decode" -p no:cacheprovider 2>&1 | tail -2
python -m twell.cli bench kernels --preset h100 --time-budget 330 --out $OUT 2>&1 | grep -v -i warn | tail -80
