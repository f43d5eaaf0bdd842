#!/usr/bin/env bash
# One pass over everything that needs a GPU, for a single device call: the compiled-kernel tests, a decode
# profile, and the benches recorded in BENCHMARKS.md. Each stage is bounded; logs go to $OUT (default ./gpu_logs).
#
#   benchmarks/gpu_check.sh                   # all stages
#   benchmarks/gpu_check.sh tests profile     # some of them: tests, profile, bench, bench_v4
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_logs}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # the benchmarks import dsinfer from this checkout

stage_tests() {   # the kernels and paths that only run compiled on a GPU (xdist spreads Triton's compiles)
    local par=""
    $PY -c "import xdist" 2>/dev/null && par="-n 4"
    timeout "${TESTS_S:-420}" $PY -m pytest -q -p no:cacheprovider $par tests/test_cuda.py tests/kernels \
        tests/models/test_v4_kernels.py tests/models/test_v4_moe.py >"$OUT/tests.txt" 2>&1
    local rc=$?
    tail -15 "$OUT/tests.txt"
    return $rc
}

stage_profile() {  # where a V3 decode step's GPU time goes, batch 1 and 32
    for b in 1 32; do
        timeout 240 $PY benchmarks/profile_decode.py --config v3 --layers 4 --batch $b --top 30 --graphs \
            >"$OUT/profile_v3_b$b.txt" 2>&1
        head -40 "$OUT/profile_v3_b$b.txt"
    done
}

stage_bench() {
    timeout 300 $PY -m dsinfer bench --config v2-lite --batch 1 8 32 128 --decode-steps 16 --prefill-len 2048 \
        >"$OUT/bench_v2lite.txt" 2>&1
    cat "$OUT/bench_v2lite.txt"
    timeout 300 $PY -m dsinfer bench --config v3 --layers 4 --batch 1 8 32 128 --decode-steps 8 \
        --prefill-len 2048 >"$OUT/bench_v3.txt" 2>&1
    cat "$OUT/bench_v3.txt"
}

stage_bench_v4() {
    timeout 300 $PY -m dsinfer bench --config v4-flash --layers 4 --batch 1 32 --decode-steps 16 --prefill-len 8192 \
        >"$OUT/bench_v4.txt" 2>&1
    cat "$OUT/bench_v4.txt"
}

status=0
for stage in "${@:-tests profile bench bench_v4}"; do
    for s in $stage; do
        echo "== $s (${SECONDS}s)"
        "stage_$s" || status=1
    done
done
exit $status
