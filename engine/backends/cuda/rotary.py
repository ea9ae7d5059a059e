"""Rotary position embedding in HF's rotate_half layout, one program per (token, block of heads).

out = x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1) for the halves x1 | x2 of a
head; math in fp32, one rounding to x's dtype. `x` may be a strided view (q and k of a fused
q|k|v projection rotated in one call) and `out` may be `x` (in place).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xn, stride_xh, stride_on, stride_oh,
                   stride_cn, num_heads, half,
                   HEADS: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    d = tl.arange(0, HALF_PAD)
    dmask = d < half
    mask = (heads < num_heads)[:, None] & dmask[None, :]
    cos1 = tl.load(cos_ptr + token * stride_cn + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + token * stride_cn + half + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + token * stride_cn + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + token * stride_cn + half + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    src = x_ptr + token * stride_xn + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + token * stride_on + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, (x1 * cos1 - x2 * sin1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty), mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """x: [N, H, D] (last dim contiguous); cos, sin: [N, D] or [N, 1, D] (rows of the model's
    rotary tables at each token's position) -> rotated [N, H, D] (`out`, which may be `x`)."""
    tokens, num_heads, head_dim = x.shape
    cos, sin = cos.reshape(tokens, head_dim), sin.reshape(tokens, head_dim)
    assert head_dim % 2 == 0 and x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    out = torch.empty_like(x) if out is None else out
    heads_per_program = min(16, triton.next_power_of_2(num_heads))
    _rotary_kernel[(tokens, triton.cdiv(num_heads, heads_per_program))](
        x, cos, sin, out, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
        num_heads, head_dim // 2, HEADS=heads_per_program, HALF_PAD=triton.next_power_of_2(head_dim // 2),
    )
    return out
