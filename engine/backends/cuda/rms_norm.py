"""RMSNorm, optionally fused with the residual add that precedes it, one program per row.

`add_rms_norm` computes h = x + residual (rounded to the activations' dtype, as an unfused
`x + residual` would be) and rmsnorm(h) in one pass over the row; math in fp32 whatever the
inputs are. Gemma's (1 + w) weights are passed precomputed, as the models hold them.
`head_rms_norm` norms each head of a strided [rows, heads, head_dim] view in place (Qwen3's q
and k inside the fused q|k|v projection), one program per row and head.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
                     stride_x, stride_r, stride_o, stride_s, stride_head, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)  # the head of a [rows, heads, dim] input (0: plain rows)
    x_ptr += head * stride_head
    out_ptr += head * stride_head
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        h = h.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, h, mask=mask)
        x = h
    x = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, out, summed):
    rows, hidden = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous() and weight.numel() == hidden
    has_residual = residual is not None
    _rms_norm_kernel[(rows, 1)](
        x, residual if has_residual else x, weight, out, summed if has_residual else out,
        x.stride(0), residual.stride(0) if has_residual else 0, out.stride(0),
        summed.stride(0) if has_residual else 0, 0, hidden, eps,
        HAS_RESIDUAL=has_residual, BLOCK=triton.next_power_of_2(hidden),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [rows, hidden] -> x * rsqrt(mean(x^2) + eps) * weight, in x's dtype."""
    out = torch.empty_like(x) if out is None else out
    _launch(x, None, weight, eps, out, None)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None, summed: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [rows, hidden] -> (rms_norm(x + residual), x + residual). `summed` may be
    `residual` itself (the residual stream updated in place)."""
    out = torch.empty_like(x) if out is None else out
    summed = torch.empty_like(x) if summed is None else summed
    _launch(x, residual, weight, eps, out, summed)
    return out, summed


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [rows, heads, head_dim], any row and head strides -> each head normed in place (weight
    [head_dim]); returns x."""
    rows, heads, dim = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous() and weight.numel() == dim
    _rms_norm_kernel[(rows, heads)](
        x, x, weight, x, x, x.stride(0), 0, x.stride(0), 0, x.stride(1), dim, eps,
        HAS_RESIDUAL=False, BLOCK=triton.next_power_of_2(dim),
    )
    return x
