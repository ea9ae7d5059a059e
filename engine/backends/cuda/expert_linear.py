"""The routed experts' linear layer of a mixture-of-experts decode step: each row's k chosen experts
applied to it, from one [experts, N, K] weight, with no host sync and no weight read for an expert
no running row chose.

One program per (output tile, expert, row tile) loads the row tile's choices first; where no row
of the tile that runs chose this expert, it exits before loading a weight byte. So a decode step
reads the weights of the experts its rows chose and no others, and a row that skips its FFN (its
`run` flag clear) chooses none: the skip costs nothing, inside a CUDA graph. Where some rows chose
the expert, the tile is computed for all of its rows (the expert's weight is read once for them)
and stored for those rows only, at the slot in which each chose it: out[row, slot] = W[e] x[row]
(x[row, slot] where the input is per slot), plus the expert's bias, times the row's routing weight
for that slot where one is given. Slots of rows that do not run are not written.

bf16 weights, fp32 accumulation (fp32 operands as fp32: kernel_support.dot_precision).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.backends.cuda import kernel_support
from engine.backends.cuda.gated_activation import clamped_swiglu, gated
from engine.backends.cuda.kernel_support import dot_precision, upcast_dots
from engine.backends.cuda.masked_linear import INTERPRETED, Tiles, block_rows, default_tiles, tile_dot

ACTIVATION_CODES = {None: 0, "silu": 1, "gelu_tanh": 2, "swiglu_clamped": 3}


@triton.jit
def _expert_linear_kernel(x_ptr, w_ptr, bias_ptr, chosen_ptr, scale_ptr, run_ptr, out_ptr,
                          rows, n_out, k_in, top_k, limit, alpha,
                          stride_xm, stride_xs, stride_we, stride_wn, stride_be, stride_om, stride_os,
                          HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                          ACTIVATION: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.program_id(1).to(tl.int64)  # an expert's offset passes 2^31 elements in large models
    m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    s = tl.arange(0, BLOCK_S)
    mmask = m < rows
    choices = tl.load(chosen_ptr + m[:, None] * top_k + s[None, :], mask=mmask[:, None] & (s < top_k)[None, :],
                      other=-1)
    hit = choices == expert  # [M, S]: at most one slot a row
    chose = (tl.max(hit.to(tl.int32), axis=1) > 0) & mmask
    if HAS_MASK:
        chose = chose & (tl.load(run_ptr + m, mask=mmask, other=0) != 0)
    if tl.max(chose.to(tl.int32), axis=0) == 0:  # no running row chose this expert: its weight is never read
        return
    slot = tl.sum(tl.where(hit, s[None, :], 0), axis=1)  # [M]: the slot each row chose it in
    x_rows = x_ptr + m[:, None] * stride_xm + slot[:, None] * stride_xs
    w_rows = w_ptr + expert * stride_we + n[:, None] * stride_wn
    nmask = n < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_in
        xmask = chose[:, None] & kmask[None, :]
        x = tl.load(x_rows + k[None, :], mask=xmask, other=0.0)
        if ACTIVATION != 0:  # x is gate | up: the activation computed as it is loaded, rounded as stored
            up = tl.load(x_rows + k_in + k[None, :], mask=xmask, other=0.0).to(tl.float32)
            if ACTIVATION == 3:
                x = clamped_swiglu(x.to(tl.float32), up, limit, alpha).to(x_ptr.dtype.element_ty)
            else:
                x = gated(x.to(tl.float32), up, ACTIVATION == 2).to(x_ptr.dtype.element_ty)
        w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = tile_dot(acc, x, w, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + m * top_k + slot, mask=chose, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + m[:, None] * stride_om + slot[:, None] * stride_os + n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=chose[:, None] & nmask[None, :])


def expert_linear(x: torch.Tensor, weight: torch.Tensor, chosen: torch.Tensor, run: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                  activation: str | None = None, limit: float = 0.0, alpha: float = 0.0,
                  out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                  tiles: Tiles | None = None) -> torch.Tensor:
    """x: [rows, K] (every slot's input) or [rows, k, K] (one per slot), last dim contiguous;
    weight: [experts, N, K] contiguous; chosen: [rows, k] int expert indices (distinct in a row);
    run: [rows] device mask (None = every row runs); bias: [experts, N]; scale: [rows, k] routing
    weights, multiplied in after the bias. activation "silu" / "gelu_tanh" / "swiglu_clamped"
    (gpt-oss's, with `limit` and `alpha`): x is a gate|up output [.., 2K] and the product's input
    act(gate, up), computed as it is loaded. -> out [rows, k, N] (`out`, else a new tensor in
    `out_dtype`, x's by default; last dim contiguous):
    out[r, j] = scale[r, j] * (weight[chosen[r, j]] x_j + bias[chosen[r, j]]) for running rows r;
    the other rows' entries are left unwritten."""
    rows, top_k = chosen.shape
    per_slot = x.dim() == 3
    k_in = x.shape[-1]
    if activation is not None:
        assert ACTIVATION_CODES[activation] and k_in % 2 == 0, activation
        k_in //= 2
    experts, n_out, _ = weight.shape
    assert weight.shape[2] == k_in and weight.is_contiguous() and x.stride(-1) == 1
    assert bias is None or (bias.shape == (experts, n_out) and bias.stride(-1) == 1)
    chosen = chosen.contiguous()
    assert scale is None or (scale.shape == chosen.shape and scale.is_contiguous())
    out = x.new_empty(rows, top_k, n_out, dtype=out_dtype or x.dtype) if out is None else out
    assert out.shape == (rows, top_k, n_out) and out.stride(-1) == 1
    if tiles is None:
        tiles = INTERPRETED if kernel_support.interpreted(x) else \
            default_tiles(rows, weight.element_size(), activation is not None)
    block_m = block_rows(rows)
    _expert_linear_kernel[(triton.cdiv(n_out, tiles.block_n), experts, triton.cdiv(rows, block_m))](
        x, weight, weight if bias is None else bias, chosen, x if scale is None else scale,
        chosen if run is None else run, out,
        rows, n_out, k_in, top_k, float(limit), float(alpha),
        x.stride(0), x.stride(1) if per_slot else 0, weight.stride(0), weight.stride(1),
        0 if bias is None else bias.stride(0), out.stride(0), out.stride(1),
        HAS_MASK=run is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        ACTIVATION=ACTIVATION_CODES[activation], UPCAST=upcast_dots(x), PRECISION=dot_precision(weight),
        BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_S=triton.next_power_of_2(top_k),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
