"""A linear layer for decode steps that reads a device-side row mask: y = x W^T for the rows that
run, and no weight read at all when none of a program's rows run.

This is how a skipped FFN costs nothing inside a CUDA graph: the skip decision is a device tensor
(no host sync), and every program of the kernel loads its rows' mask first; when no row runs it
writes its output tile (zeros, or the residual) and exits before touching the weight. When some
rows run, the tile is computed for all its rows (the weight is read anyway) and the rows that do
not run are written as if skipped.

Skipped rows: out = residual when one is given (the FFN's down projection writes h + FFN(h) for
running rows and h for the others), else zeros (the gate|up projection, whose zeros pass through
the gated activation as zeros). bf16 weights, fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.backends.cuda import kernel_support
from engine.backends.cuda.kernel_support import dot_precision, dot_size, upcast_dots


@triton.jit
def _masked_linear_kernel(x_ptr, w_ptr, run_ptr, residual_ptr, out_ptr, rows, n_out, k_in,
                          stride_x, stride_w, stride_r, stride_o,
                          HAS_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = m < rows
    out_mask = mmask[:, None] & (n < n_out)[None, :]
    out_ptrs = out_ptr + m[:, None] * stride_o + n[None, :]
    run = mmask
    if HAS_MASK:
        run = (tl.load(run_ptr + m, mask=mmask, other=0) != 0) & mmask
    skipped = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if HAS_RESIDUAL:
        skipped = tl.load(residual_ptr + m[:, None] * stride_r + n[None, :], mask=out_mask, other=0.0).to(tl.float32)
    if tl.max(run.to(tl.int32), axis=0) == 0:  # no row of this tile runs: the weight is never read
        tl.store(out_ptrs, skipped.to(out_ptr.dtype.element_ty), mask=out_mask)
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_in
        x = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + n[:, None] * stride_w + k[None, :], mask=(n < n_out)[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            x = x.to(w.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_RESIDUAL:
        acc += skipped
    tl.store(out_ptrs, tl.where(run[:, None], acc, skipped).to(out_ptr.dtype.element_ty), mask=out_mask)


def tiles(rows: int, element_size: int = 2, interpreted: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for `rows` rows: all rows in one tile up to 64 (decode batches
    read the weight once), narrow output tiles so a GEMV spreads over many programs; fp32 operands
    take half the depth, so that 64 rows' pipelined tiles stay within 99 KB of shared memory
    (sm_86/89; scripts/triton_compile_check.py). Triton's interpreter (CPU tensors) pays Python
    per program and per op, not per element: wide tiles."""
    block_m = min(64, dot_size(rows))
    if interpreted:
        return block_m, 256, 256
    return block_m, 32 if block_m <= 16 else 64, 128 if element_size <= 2 else 64


def masked_linear(x: torch.Tensor, weight: torch.Tensor, run: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [rows, K] (last dim contiguous); weight: [N, K] contiguous; run: [rows] bool/int device
    mask (None = every row runs); residual: [rows, N] or None. -> out [rows, N] in x's dtype:
    residual + x W^T for running rows; residual (or zeros) for the others. `out` may be `residual`."""
    rows, k_in = x.shape
    n_out = weight.shape[0]
    assert weight.shape[1] == k_in and weight.is_contiguous() and x.stride(-1) == 1
    out = x.new_empty(rows, n_out) if out is None else out
    block_m, block_n, block_k = tiles(rows, weight.element_size(), kernel_support.interpreted(x))
    _masked_linear_kernel[(triton.cdiv(n_out, block_n), triton.cdiv(rows, block_m))](
        x, weight, x if run is None else run, out if residual is None else residual, out,
        rows, n_out, k_in, x.stride(0), weight.stride(0),
        0 if residual is None else residual.stride(0), out.stride(0),
        HAS_MASK=run is not None, HAS_RESIDUAL=residual is not None, UPCAST=upcast_dots(x),
        PRECISION=dot_precision(weight),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
