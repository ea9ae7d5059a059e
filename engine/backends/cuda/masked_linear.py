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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.backends.cuda import kernel_support
from engine.backends.cuda.gated_activation import ACTIVATIONS, gated
from engine.backends.cuda.kernel_support import dot_precision, dot_size, upcast_dots


@triton.jit
def tile_dot(acc, x, w, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + x w^T for an input tile x [M, K] and a weight tile w [N, K]: operands as fp32 where
    the interpreter needs them (kernel_support.upcast_dots), else x in the weight's dtype."""
    if UPCAST:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    else:
        x = x.to(w.dtype)
    return acc + tl.dot(x, tl.trans(w), input_precision=PRECISION)


@triton.jit
def _masked_linear_kernel(x_ptr, w_ptr, run_ptr, residual_ptr, out_ptr, rows, n_out, k_in,
                          stride_x, stride_w, stride_r, stride_o,
                          HAS_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED_INPUT: tl.constexpr,
                          GELU_TANH: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        xmask = mmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=xmask, other=0.0)
        if GATED_INPUT:  # x is gate | up: act(gate) * up, rounded as the separate kernel rounds it
            up = tl.load(x_ptr + m[:, None] * stride_x + k_in + k[None, :], mask=xmask, other=0.0)
            x = gated(x.to(tl.float32), up.to(tl.float32), GELU_TANH).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + n[:, None] * stride_w + k[None, :], mask=(n < n_out)[:, None] & kmask[None, :], other=0.0)
        acc = tile_dot(acc, x, w, UPCAST, PRECISION)
    if HAS_RESIDUAL:
        acc += skipped
    tl.store(out_ptrs, tl.where(run[:, None], acc, skipped).to(out_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class Tiles:
    """How the kernel covers an output: BLOCK_N x BLOCK_K weight tiles (the rows' tile is
    `block_rows`), with this many warps and pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# What a GPU tries (tile_tuning.py); the first two are the defaults of untuned shapes, and fit the
# 99 KB of shared memory of sm_86/89 at 64 rows in bf16 (scripts/triton_compile_check.py).
CANDIDATES = (Tiles(32, 128), Tiles(64, 128), Tiles(16, 128, 4, 4), Tiles(16, 256), Tiles(32, 64, 4, 4),
              Tiles(32, 256), Tiles(64, 64, 4, 4), Tiles(64, 128, 8), Tiles(128, 64, 8))
INTERPRETED = Tiles(256, 256)  # Triton's interpreter pays Python per program and per op, not per element
_tuned: dict[tuple, Tiles] = {}  # (n_out, k_in, block_rows, dtype) -> the tiles measured fastest


def block_rows(rows: int) -> int:
    """The rows' tile: all rows in one up to 64 (a decode batch reads the weight once)."""
    return min(64, dot_size(rows))


def tuning_key(weight: torch.Tensor, rows: int, activation: str | None) -> tuple:
    return (*weight.shape, block_rows(rows), weight.dtype, activation)


def use_tiles(weight: torch.Tensor, rows: int, activation: str | None, tiles: Tiles) -> None:
    """From now on every product of `rows` rows (or any count with the same row tile) with a
    weight of this shape and dtype, and this activation fused into its input, runs on `tiles`."""
    _tuned[tuning_key(weight, rows, activation)] = tiles


def tuned_tiles(weight: torch.Tensor, rows: int, activation: str | None) -> Tiles | None:
    return _tuned.get(tuning_key(weight, rows, activation))


def default_tiles(rows: int, element_size: int, gated_input: bool) -> Tiles:
    """Untuned: narrow output tiles so a GEMV spreads over many programs; wider ones beside many
    rows. fp32 operands, and a gate|up input (two input tiles a step), half the depth each, so
    that 64 rows' pipelined tiles stay within 99 KB (sm_86/89; scripts/triton_compile_check.py)."""
    tiles = CANDIDATES[0] if block_rows(rows) <= 16 else CANDIDATES[1]
    depth = tiles.block_k // (1 if element_size <= 2 else 2) // (2 if gated_input else 1)
    return tiles if depth == tiles.block_k else Tiles(tiles.block_n, depth)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, run: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  tiles: Tiles | None = None, activation: str | None = None) -> torch.Tensor:
    """x: [rows, K] (last dim contiguous); weight: [N, K] contiguous; run: [rows] bool/int device
    mask (None = every row runs); residual: [rows, N] or None. -> out [rows, N] in x's dtype:
    residual + x W^T for running rows; residual (or zeros) for the others. `out` may be `residual`.
    activation "silu" / "gelu_tanh": x is a gate|up projection [rows, 2K] and the product's input
    act(gate) * up, computed as it is loaded (gated_activation.py's math and rounding).
    tiles: these (tuning, the compile check), else the ones tuned for this shape, else defaults."""
    rows, k_in = x.shape
    if activation is not None:
        assert activation in ACTIVATIONS and k_in % 2 == 0, activation
        k_in //= 2
    n_out = weight.shape[0]
    assert weight.shape[1] == k_in and weight.is_contiguous() and x.stride(-1) == 1
    out = x.new_empty(rows, n_out) if out is None else out
    if tiles is None:
        tiles = (INTERPRETED if kernel_support.interpreted(x) else
                 tuned_tiles(weight, rows, activation) or
                 default_tiles(rows, weight.element_size(), activation is not None))
    block_m = block_rows(rows)
    _masked_linear_kernel[(triton.cdiv(n_out, tiles.block_n), triton.cdiv(rows, block_m))](
        x, weight, x if run is None else run, out if residual is None else residual, out,
        rows, n_out, k_in, x.stride(0), weight.stride(0),
        0 if residual is None else residual.stride(0), out.stride(0),
        HAS_MASK=run is not None, HAS_RESIDUAL=residual is not None, GATED_INPUT=activation is not None,
        GELU_TANH=activation == "gelu_tanh", UPCAST=upcast_dots(x),
        PRECISION=dot_precision(weight), BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
