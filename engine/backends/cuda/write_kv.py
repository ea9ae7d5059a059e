"""Writes a step's new K and V into the paged cache at slot = block * block_size + offset.

A slot < 0 writes nothing: padded rows of a CUDA-graph bucket carry -1, so they never touch a
block that a real sequence owns. The attention kernel (decode_attention.py) only reads the cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kn, stride_kh, stride_vn, stride_vh,
                     stride_cb, stride_ch, stride_co,
                     block_size, head_dim, HEAD_PAD: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    d = tl.arange(0, HEAD_PAD)
    dmask = d < head_dim
    dst = block.to(tl.int64) * stride_cb + head * stride_ch + offset * stride_co + d
    k = tl.load(k_ptr + token * stride_kn + head * stride_kh + d, mask=dmask)
    v = tl.load(v_ptr + token * stride_vn + head * stride_vh + d, mask=dmask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=dmask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=dmask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v: [N, KV, D] (last dim contiguous); caches: [blocks, KV, block_size, D] of one layer
    (contiguous); slots: [N] int (block * block_size + offset, < 0 = write nothing)."""
    num_tokens, num_kv, head_dim = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    _write_kv_kernel[(num_tokens, num_kv)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[2], head_dim, HEAD_PAD=triton.next_power_of_2(head_dim),
    )
