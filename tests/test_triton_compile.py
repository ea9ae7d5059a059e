"""The CUDA decode step's Triton kernels compile for real GPUs (sm_90: H100/H200; sm_89: L4,
RTX 4090) on this host, in bf16 (and fp32 on sm_89), with each kernel's shared memory within the
architecture's per-block limit, at SmolLM2's and a 7B Llama's shapes, Gemma 3 1B's (256-wide
heads, whose decode attention takes 42 KB of shared memory in bf16 and 84 KB in fp32; the
Gemma norms), Gemma 2 2B's (capped scores), Qwen3 0.6B's (per-head q/k norms in the step),
Phi-4-mini's (partial rotary), and on sm_90 Qwen3-30B-A3B's and gpt-oss-20b's (the routed
experts; gpt-oss's biases, sinks and clamped SwiGLU), one row and 64
(scripts/triton_compile_check.py). sm_80 (A100) is left to the script: the code Triton emits
for it is sm_89's, less nothing these kernels use, and its per-block shared memory is larger
(163 KB against 99 KB), so what compiles and fits on sm_89 does there. The
interpreted kernel tests check values; this checks what the interpreter never runs: Triton's
compiler and ptxas (both in triton's pip wheel). On a CUDA host the kernels compile for the card
itself in the CUDA tests instead."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is a test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parent.parent


def compile_check(*runs: tuple[str, ...]) -> list[str]:
    """scripts/triton_compile_check.py's table rows, one run a tuple of its arguments, the runs side
    by side (each is one compiler at a time; each must succeed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script compiles: no interpreter

    def run(args: tuple[str, ...]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/triton_compile_check.py", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)

    with ThreadPoolExecutor(len(runs)) as pool:
        outs = list(pool.map(run, runs))
    rows = []
    for out in outs:
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        rows += [line for line in out.stdout.splitlines() if line.startswith("| ") and "| kernel |" not in line]
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA host the CUDA tests compile for the card itself")
def test_decode_step_kernels_compile_for_h100_and_l4_within_shared_memory():
    dense = "smollm2-135m,llama-7b,gemma3-1b,gemma2-2b,qwen3-0.6b,phi4-mini"
    rows = compile_check(
        *(("--shape", dense, "--arch", arch, "--rows", "1,64", "--dtype", "bfloat16", "--no-tuning-candidates")
          for arch in ("90", "89")),
        # the mixtures' routed experts on the H100/H200 (sm_89 and sm_80, fp32 too, were compiled by
        # hand: within their limits; each architecture costs about 20 s more here)
        ("--shape", "qwen3-30b-a3b,gpt-oss-20b", "--arch", "90", "--rows", "1,64", "--dtype", "bfloat16",
         "--no-tuning-candidates"),
        # fp32 doubles every tile's shared memory: checked where it is tightest (sm_89's 99 KB) on the
        # narrowest and widest heads; the step's code is the same for every shape (a cold compile of
        # every shape in fp32 on both architectures took two more minutes on a 2-core host)
        ("--shape", "smollm2-135m,gemma3-1b", "--arch", "89", "--rows", "1,64", "--dtype", "float32",
         "--no-tuning-candidates"))
    kernels = {line.split("|")[3].strip() for line in rows}  # | shape | dtype | kernel | ...
    assert {line.split("|")[2].strip() for line in rows} == {"bfloat16", "float32"}
    # every kernel the step launches compiled: attention (split + merge), rotary with the K/V write, norms,
    # the skip gate (per-row decision; cosine + batch-aligned decision), the masked FFN and the
    # dense FFN's activation, the mixtures' routed experts; and the eager path's K/V write
    assert {"_split_kernel", "_reduce_kernel", "_write_kv_kernel", "_rms_norm_kernel", "_rotary_kv_kernel",
            "_decide_rows_kernel", "_cosine_kernel", "_decide_aligned_kernel", "_masked_linear_kernel",
            "_gated_kernel", "_expert_linear_kernel"} <= kernels, kernels
    assert not [line for line in rows if "over the limit" in line or "candidate" in line]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA host the tile tuning runs on the card itself")
def test_every_masked_linear_tiling_an_h100_may_tune_to_compiles_and_fits():
    """The tiles tile_tuning.py times at start (a tiling that does not launch is passed over there;
    on an H100 all of them should launch)."""
    from engine.backends.cuda.masked_linear import CANDIDATES

    rows = compile_check(("--shape", "llama-7b", "--arch", "90", "--rows", "1", "--dtype", "bfloat16"))
    candidates = {line.split("|")[3].strip() for line in rows if "candidate" in line}
    # the step's own tiles (the defaults) are listed as the step's; every other candidate as one
    assert len(candidates) >= len({(t.block_n, t.block_k) for t in CANDIDATES}) - 1, candidates
    assert not [line for line in rows if "over the limit" in line]
