#!/usr/bin/env bash
# Full-size DeepSeek-V3 (671B shape, random FP8 weights) on 8 GPUs: the runs recorded in BENCHMARKS.md.
#
#   benchmarks/v3_full_tp8.sh bench      # decode b1/32/128/256, prefill 4k/32k, start-up, memory per GPU
#   benchmarks/v3_full_tp8.sh compare    # greedy tokens: fast path vs the plain eager path, both TP=8
#   benchmarks/v3_full_tp8.sh serve      # the OpenAI server under load (64 and 256 concurrent clients)
#
# Logs go to $OUT (default ./v3_full_logs). TP=${TP:-8}; LAYERS=N cuts the model for a smaller trial run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./v3_full_logs}
mkdir -p "$OUT"
TP=${TP:-8}
DEVICE=${DEVICE:-cuda}
LAYERS_ARG=${LAYERS:+--layers $LAYERS}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1      # SIGABRT prints every thread's Python stack
PATTERN="python3? .*(compare_eager|-m dsinfer)"      # this run's processes (rank 0, the workers, the server)

limited() {   # limited SECONDS LOG CMD...: CMD's output to LOG; past SECONDS, every process's stacks, then kill
    local limit=$1 log=$2; shift 2
    "$@" >"$log" 2>&1 &
    local pid=$! t=0
    while kill -0 $pid 2>/dev/null; do
        if (( t >= limit )); then
            echo "over ${limit}s: stacks (in $log), then kill" | tee -a "$log"
            pkill -ABRT -f "$PATTERN"; sleep 5; pkill -9 -f "$PATTERN"; wait $pid
            cat "$log"; return 124
        fi
        sleep 1; t=$((t + 1))
    done
    wait $pid; local rc=$?
    cat "$log"; return $rc
}

smi() {   # per-GPU memory in use, every 5 s, while a stage runs
    nvidia-smi --query-gpu=timestamp,index,memory.used,memory.total --format=csv -l 5 >"$OUT/$1-memory.csv" 2>&1 &
    echo $!
}

stage_bench() {
    local pid; pid=$(smi bench)
    limited "${LIMIT:-480}" "$OUT/bench.txt" $PY -m dsinfer bench --config v3 $LAYERS_ARG --tp "$TP" --device "$DEVICE" \
        --batch ${BATCHES:-1 32 128 256} --decode-steps 32 --prefill-len ${PREFILL:-4096 32768}
    local rc=$?
    kill "$pid"
    return $rc
}

stage_compare() {
    limited "${LIMIT:-300}" "$OUT/compare.txt" $PY benchmarks/compare_eager.py --config v3 $LAYERS_ARG --tp "$TP" \
        --device "$DEVICE" --prompts 8 --max-prompt-len 300 --max-tokens 16 --stall-s 100
}

stage_serve() {
    local pid port=8000
    pid=$(smi serve)
    $PY -m dsinfer serve --random-weights v3 $LAYERS_ARG --tp "$TP" --device "$DEVICE" --max-num-seqs 256 \
        --port $port --log-level warning >"$OUT/server.log" 2>&1 &
    local server=$!
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
        kill -0 $server 2>/dev/null || { echo "server exited"; tail -20 "$OUT/server.log"; kill "$pid"; return 1; }
        sleep 1
    done
    echo "server up after ${SECONDS}s of this script"
    $PY benchmarks/load_server.py --url "http://127.0.0.1:$port" --clients 64 256 --requests 512 \
        --max-tokens 64 --duration ${LOAD_S:-120} 2>&1 | tee "$OUT/load.txt"
    local rc=$?
    kill -INT $server                                   # a clean stop takes seconds
    for _ in $(seq 30); do kill -0 $server 2>/dev/null || break; sleep 1; done
    kill -0 $server 2>/dev/null && { echo "server still up 30 s after SIGINT: stacks, then kill";
                                     pkill -ABRT -f "$PATTERN"; sleep 5; pkill -9 -f "$PATTERN"; rc=1; }
    kill "$pid"
    return $rc
}

status=0
for stage in "$@"; do
    echo "== $stage (${SECONDS}s)"
    "stage_$stage" || status=1
done
exit $status
