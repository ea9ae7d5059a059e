"""Torch-facing wrappers of the C++ kernels: check layouts, pass pointers, allocate outputs."""
from __future__ import annotations

import torch

from engine.native.build import kernels


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (kernels() is not None and q.device.type == "cpu" and q.dtype == torch.float32
            and k_cache.dtype == torch.float32 and k_cache.is_contiguous())


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
                     lengths: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q: [B, H, D] fp32; caches: [slots, KV, max_len, D] of one layer; slot_ids, lengths: [B] int64
    (lengths include the new token, already written) -> [B, H*D]."""
    rows, heads, dim = q.shape
    q = q.contiguous()
    out = torch.empty(rows, heads * dim, dtype=q.dtype)
    kernels().decode_attention_f32(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_ids.data_ptr(), lengths.data_ptr(),
        out.data_ptr(), rows, heads, k_cache.shape[1], dim, k_cache.shape[2], window or 0, scale,
        torch.get_num_threads())
    return out
