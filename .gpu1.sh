export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 280 python -m pytest -p no:cacheprovider -p no:warnings -n 4 tests/kernels/test_fp8_gemv.py tests/kernels/test_fused_moe.py tests/kernels/test_fp8_triton.py tests/models/test_v4_moe.py tests/models/test_v4_kernels.py tests/engine/test_v4_decode.py > $OUT/tests.txt 2>&1; tail -5 $OUT/tests.txt
timeout 100 python benchmarks/bench_fp8_gemv.py 2>&1 | tee $OUT/gemv.txt
timeout 150 python -m dsinfer bench --config v4-flash --layers 4 --batch 1 32 --decode-steps 32 --prefill-len 8192 2>&1 | tail -12 | tee $OUT/bench.txt
timeout 60 python benchmarks/profile_decode.py --config v4-flash --layers 4 --batch 1 --top 30 --graphs 2>&1 | tail -31 > $OUT/prof.txt; head -20 $OUT/prof.txt
