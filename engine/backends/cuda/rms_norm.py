"""RMSNorm, optionally fused with the residual add that precedes it, one program per row.

`add_rms_norm` computes h = x + residual (rounded to the activations' dtype, as an unfused
`x + residual` would be) and rmsnorm(h) in one pass over the row; math in fp32 whatever the
inputs are. Gemma's (1 + w) weights are passed precomputed, as the models hold them. Gemma norms
a branch before it joins the residual: with `x_weight`, x is first rmsnorm(x, x_weight) (rounded
as an unfused norm's output), and `norm_add` is that sum alone (its FFN's post-norm).
`head_rms_norm` norms each head of a strided [rows, heads, head_dim] view in place (Qwen3's q
and k inside the fused q|k|v projection), one program per row and head.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, x_weight_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
                     stride_x, stride_r, stride_o, stride_s, stride_head, hidden, eps,
                     NORM_X: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM_OUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)  # the head of a [rows, heads, dim] input (0: plain rows)
    x_ptr += head * stride_head
    out_ptr += head * stride_head
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if NORM_X:  # the branch normed before it joins the residual (a row of zeros stays zeros)
        xf = x.to(tl.float32)
        inv_rms_x = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
        x_w = tl.load(x_weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = (xf * inv_rms_x * x_w).to(x_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        h = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        h = h.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, h, mask=mask)
        x = h
    if NORM_OUT:
        x = x.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, x_weight, residual, weight, eps, out, summed):
    rows, hidden = x.shape
    assert x.stride(-1) == 1
    for w in (x_weight, weight):
        assert w is None or (w.is_contiguous() and w.numel() == hidden)
    has_residual, norm_out = residual is not None, weight is not None
    _rms_norm_kernel[(rows, 1)](
        x, x if x_weight is None else x_weight, residual if has_residual else x, weight if norm_out else x,
        out if norm_out else summed, summed if has_residual else out,
        x.stride(0), residual.stride(0) if has_residual else 0, out.stride(0) if norm_out else 0,
        summed.stride(0) if has_residual else 0, 0, hidden, eps,
        NORM_X=x_weight is not None, HAS_RESIDUAL=has_residual, NORM_OUT=norm_out,
        BLOCK=triton.next_power_of_2(hidden),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [rows, hidden] -> x * rsqrt(mean(x^2) + eps) * weight, in x's dtype."""
    out = torch.empty_like(x) if out is None else out
    _launch(x, None, None, weight, eps, out, None)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None, summed: torch.Tensor | None = None,
                 x_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [rows, hidden] -> (rms_norm(x + residual), x + residual); with `x_weight`
    (Gemma's post-attention norm), rms_norm(x, x_weight) in x's place. `summed` may be `residual`
    itself (the residual stream updated in place)."""
    out = torch.empty_like(x) if out is None else out
    summed = torch.empty_like(x) if summed is None else summed
    _launch(x, x_weight, residual, weight, eps, out, summed)
    return out, summed


def norm_add(x: torch.Tensor, x_weight: torch.Tensor, residual: torch.Tensor, eps: float,
             summed: torch.Tensor | None = None) -> torch.Tensor:
    """x, residual: [rows, hidden] -> residual + rms_norm(x, x_weight) (Gemma's FFN output joining
    the residual; rows of zeros, FFNs that did not run, leave it as it is). `summed` may be
    `residual`."""
    summed = torch.empty_like(x) if summed is None else summed
    _launch(x, x_weight, residual, None, eps, None, summed)
    return summed


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [rows, heads, head_dim], any row and head strides -> each head normed in place (weight
    [head_dim]); returns x."""
    rows, heads, dim = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous() and weight.numel() == dim
    _rms_norm_kernel[(rows, heads)](
        x, x, x, weight, x, x, x.stride(0), 0, x.stride(0), 0, x.stride(1), dim, eps,
        NORM_X=False, HAS_RESIDUAL=False, NORM_OUT=True, BLOCK=triton.next_power_of_2(dim),
    )
    return x
