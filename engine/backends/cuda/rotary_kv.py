"""The new token's rotary embedding and K/V write in one launch, on a fused q|k|v projection
[N, H + 2 KV, D]: q rotated in place (attention reads it there), k rotated and v copied into the
paged cache at slot = block * block_size + offset. A slot < 0 writes nothing to the cache (padded
rows of a CUDA-graph bucket). Rotary in HF's rotate_half layout: x * cos + rotate_half(x) * sin,
rotate_half(x) = (-x2, x1) for the halves x1 | x2 of a head's rotated part (all of it, or its
leading dimensions: Phi-4-mini's partial rotary); math in fp32, one rounding to the destination's
dtype. One program per (token, block of q and k heads); a k head's lane also
moves its v head.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                      stride_n, stride_h, stride_cn, stride_cb, stride_ch, stride_co,
                      num_heads, num_kv, half, head_dim, block_size,
                      HEADS: tl.constexpr, HALF_PAD: tl.constexpr, HEAD_PAD: tl.constexpr, PARTIAL: tl.constexpr):
    token = tl.program_id(0)
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    d = tl.arange(0, HALF_PAD)
    dmask = d < half
    mask = (h < num_heads + num_kv)[:, None] & dmask[None, :]
    cos1 = tl.load(cos_ptr + token * stride_cn + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + token * stride_cn + half + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + token * stride_cn + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + token * stride_cn + half + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    row = qkv_ptr + token * stride_n + h[:, None] * stride_h  # each lane's head
    x1 = tl.load(row + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + half + d[None, :], mask=mask, other=0.0).to(tl.float32)
    r1 = x1 * cos1 - x2 * sin1
    r2 = x2 * cos2 + x1 * sin2
    is_q = mask & (h < num_heads)[:, None]
    tl.store(row + d[None, :], r1.to(qkv_ptr.dtype.element_ty), mask=is_q)
    tl.store(row + half + d[None, :], r2.to(qkv_ptr.dtype.element_ty), mask=is_q)
    slot = tl.load(slot_ptr + token)
    k_rows = ((h >= num_heads) & (h < num_heads + num_kv) & (h * 0 + slot >= 0))[:, None]  # slot broadcast
    slot_row = ((slot // block_size).to(tl.int64) * stride_cb + (h - num_heads)[:, None] * stride_ch
                + (slot % block_size) * stride_co)
    is_k = k_rows & dmask[None, :]
    tl.store(k_cache_ptr + slot_row + d[None, :], r1.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_cache_ptr + slot_row + half + d[None, :], r2.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    e = tl.arange(0, HEAD_PAD)[None, :]
    if PARTIAL:  # k's dimensions past the rotated ones go in as projected (q's stay as they are)
        tail = k_rows & (2 * half + e < head_dim)
        tl.store(k_cache_ptr + slot_row + 2 * half + e,
                 tl.load(row + 2 * half + e, mask=tail).to(k_cache_ptr.dtype.element_ty), mask=tail)
    whole = k_rows & (e < head_dim)
    v_row = row + num_kv * stride_h  # this k head's v head
    tl.store(v_cache_ptr + slot_row + e, tl.load(v_row + e, mask=whole).to(v_cache_ptr.dtype.element_ty), mask=whole)


def rotary_and_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slots: torch.Tensor, num_heads: int, num_kv: int) -> None:
    """qkv: [N, num_heads + 2 num_kv, D] (last dim contiguous); cos, sin: [N, R] (the rotary
    tables' rows at each token's position; R <= D, even: the leading R dimensions of each head are
    rotated, the rest kept, as Phi-4-mini's partial rotary); caches: [blocks, num_kv, block_size,
    D] of one layer (contiguous); slots: [N] int (< 0: no write). q is rotated in place; qkv's k
    and v are left."""
    tokens, width, head_dim = qkv.shape
    rotary_dim = cos.shape[-1]
    assert width == num_heads + 2 * num_kv and rotary_dim % 2 == 0 and rotary_dim <= head_dim and qkv.stride(-1) == 1
    assert cos.shape == sin.shape == (tokens, rotary_dim) and cos.stride() == sin.stride() and cos.stride(-1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[-1] == head_dim
    heads_per_program = min(16, triton.next_power_of_2(num_heads + num_kv))
    _rotary_kv_kernel[(tokens, triton.cdiv(num_heads + num_kv, heads_per_program))](
        qkv, cos, sin, slots, k_cache, v_cache, qkv.stride(0), qkv.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_heads, num_kv, rotary_dim // 2, head_dim,
        k_cache.shape[2], HEADS=heads_per_program, HALF_PAD=triton.next_power_of_2(rotary_dim // 2),
        HEAD_PAD=triton.next_power_of_2(head_dim), PARTIAL=rotary_dim < head_dim,
    )
