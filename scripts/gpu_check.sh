#!/usr/bin/env bash
# What a CUDA machine with little time on it should check, in one call, cheapest and most telling
# first, each step under its own time limit: the Triton kernels and graph buffers against torch,
# the engine on CUDA against HF and graphs against eager, then bench/gpu.py on the embedded model,
# the served model on CUDA with and without a skip budget at 1-64 clients (bench/serve.py), and
# bench/gpu.py on a 7B Llama shape (random weights), dense and with a forced skip. Run it from the
# repository root with the server's dependencies installed: bash scripts/gpu_check.sh
# Each step's whole log goes to $OUT (default /tmp/gpu_check); the last lines of each are printed.
# A failed step does not stop the later ones. STEPS="kernels bench-7b" runs a subset.
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
STEPS=${STEPS:-"kernels cuda bench-smollm2 serve-smollm2 bench-7b"}
mkdir -p "$OUT"

step() {  # name, seconds, command...
    local name=$1 limit=$2 rc
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL:-12}" "$OUT/$name.log"
    echo "== $name: exit $rc$([ $rc = 124 ] && echo ' (time limit)')"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step kernels 200 $PY -m pytest -q -x tests/test_triton_kernels.py tests/test_tile_tuning.py tests/test_device_skip_gate.py \
    tests/test_cuda_graphs.py
step cuda 300 $PY -m pytest -q tests/test_cuda.py tests/test_sampler.py tests/test_structured_output.py
step bench-smollm2 150 $PY bench/gpu.py --model smollm2-135m-instruct --batches 1,16 --hf-batches 1,16 --no-compile \
    --rounds 1 --out "$OUT/smollm2"
# the served goal: budget 0.25 (the preset's threshold) never slower than dense at any concurrency
step serve-smollm2 420 bash -c '
    "$0" -m server.cli --device cuda --max-num-seqs 64 --port 8765 > "$1/server.log" 2>&1 &
    server=$!
    trap "kill $server; wait $server" EXIT
    "$0" -c "import time, httpx
for _ in range(600):  # a fresh card compiles, tunes and captures first
    try:
        if httpx.get(\"http://127.0.0.1:8765/health\").status_code == 200: break
    except httpx.HTTPError: pass
    time.sleep(0.5)
else: raise SystemExit(\"the server did not become ready\")" &&
    "$0" bench/serve.py --url http://127.0.0.1:8765 --concurrency 1,4,16,64 --budgets 0,0.25 --max-tokens 64 \
        --out "$1/serve"' "$PY" "$OUT"
step bench-7b 300 $PY bench/gpu.py --batches 1,16 --hf-batches 1 --skip-batches 1,16 --no-compile --rounds 1 \
    --out "$OUT/7b"
