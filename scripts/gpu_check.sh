#!/usr/bin/env bash
# What a CUDA machine with little time on it should check, in one call, cheapest and most telling
# first, each step under its own time limit: the Triton kernels and graph buffers against torch,
# the engine on CUDA against HF and graphs against eager, then bench/gpu.py on the embedded model,
# the served model on CUDA with and without a skip budget at 1-64 clients (bench/serve.py), and
# bench/gpu.py on a 7B Llama shape (random weights), dense and with a forced skip (bench-moe, not
# in the default steps: the same on a Qwen3-30B-A3B-shaped mixture of experts). Run it from the
# repository root with the server's dependencies installed: bash scripts/gpu_check.sh
# Each step's whole log goes to $WORK (default /tmp/gpu_check); the last lines of each are printed.
# With $OUT set (the device tool's folder of what comes back, 8 files at most), the logs, the
# benchmarks' files and the test servers' logs (.pytest_cache/server-*.log) end as one archive,
# $OUT/gpu_check.tgz.
# A failed step does not stop the later ones. STEPS="kernels bench-7b" runs a subset; LIMIT_<step>
# (dashes as underscores: LIMIT_bench_7b=400) changes a step's time limit.
#
# The limits add up to more than one device call (10 minutes) and than a lent GPU's 15 minutes in
# all: split the steps over calls, most telling first, e.g. STEPS="kernels cuda" (about 6 min), then
# STEPS="bench-7b bench-smollm2" (about 6 min; the 7B folder is made once and kept under the cache
# folder for a later call on the same warm machine), and serve-smollm2 where time is left.
set -u
WORK=${WORK:-/tmp/gpu_check}
PY=${PY:-python3}
STEPS=${STEPS:-"kernels cuda bench-smollm2 serve-smollm2 bench-7b"}
mkdir -p "$WORK"

step() {  # name, seconds, command...
    local name=$1 limit=$2 rc var
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    var="LIMIT_${name//-/_}"
    limit=${!var:-$limit}
    echo "== $name (at most ${limit} s): $*"
    # SIGINT first: pytest prints its summary, bench/gpu.py cleans up; then KILL 15 s later
    timeout -s INT -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL:-12}" "$WORK/$name.log"
    echo "== $name: exit $rc$([ $rc = 124 ] && echo ' (time limit)')"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
df -h /tmp | tail -1
step kernels 200 $PY -m pytest -q --maxfail=5 --durations=10 tests/test_triton_kernels.py tests/test_tile_tuning.py \
    tests/test_device_skip_gate.py tests/test_cuda_graphs.py tests/test_cuda_decode_step.py
# (the CUDA tests; the sampler's and structured outputs' on the card as well; the Gemma package is
# not carried there)
step cuda 300 $PY -m pytest -q --durations=10 tests/test_cuda.py tests/test_sampler.py tests/test_structured_output.py \
    --deselect "tests/test_structured_output.py::test_token_bytes_are_what_decoding_each_token_gives[gemma3-270m]"
step bench-smollm2 150 $PY bench/gpu.py --model smollm2-135m-instruct --batches 1,16 --hf-batches 1,16 --no-compile \
    --rounds 1 --out "$WORK/smollm2"
# the served goal: budget 0.25 (the preset's threshold) never slower than dense at any concurrency
step serve-smollm2 420 bash -c '
    "$0" -m server.cli --device cuda --max-num-seqs 64 --kv-cache-memory 8 --port 8765 > "$1/server.log" 2>&1 &
    server=$!
    trap "kill $server; wait $server" EXIT
    "$0" -c "import os, sys, time, httpx
for _ in range(600):  # a fresh card compiles, tunes and captures first
    try:
        os.kill(int(sys.argv[1]), 0)
    except OSError: raise SystemExit(\"the server exited (server.log)\")
    try:
        if httpx.get(\"http://127.0.0.1:8765/health\").status_code == 200: break
    except httpx.HTTPError: pass
    time.sleep(0.5)
else: raise SystemExit(\"the server did not become ready\")" "$server" &&
    { grep -i "capture failed" "$1/server.log" || true; } &&
    "$0" bench/serve.py --url http://127.0.0.1:8765 --concurrency 1,4,16,64 --budgets 0,0.25 --max-tokens 64 \
        --out "$1/serve"' "$PY" "$WORK"
step bench-7b 300 $PY bench/gpu.py --batches 1,16 --hf-batches 1 --skip-batches 1,16 --no-compile --rounds 1 \
    --out "$WORK/7b"
step bench-moe 300 $PY bench/gpu.py --shape qwen3-30b-a3b --no-hf --batches 1,16 --skip-batches 1,16 --rounds 1 \
    --out "$WORK/moe"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$WORK/test-servers" && cp .pytest_cache/server-*.log "$WORK/test-servers/" 2>/dev/null
    tar czf "$OUT/gpu_check.tgz" -C "$WORK" . && echo "== all logs and results: gpu_check.tgz"
fi
