"""The KV cache tensors: per layer K and V of shape [num_blocks, num_kv_heads, block_size, head_dim].

Which block belongs to whom is the scheduler's business (`engine/kv/block_manager.py`); this file
only owns the memory. A block keeps a head's `block_size` keys contiguous, so a kernel streams one
block's keys (or values) for one head as a single run of memory.
"""
from __future__ import annotations

import torch

from engine.kv import int8_rows


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 device, dtype):
        """dtype torch.int8: each head's row is int8_rows.row_bytes(head_dim) bytes (values, then scales)."""
        row = int8_rows.row_bytes(head_dim) if dtype == torch.int8 else head_dim
        shape = (num_layers, num_blocks, num_kv_heads, block_size, row)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def element_bytes(dtype: torch.dtype, head_dim: int) -> float:
    """A cache of `dtype`'s bytes per K or V value (int8: with its row's scales)."""
    if dtype == torch.int8:
        return int8_rows.row_bytes(head_dim) / head_dim
    return torch.empty(0, dtype=dtype).element_size()


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K or V rows [..., head_dim] as a cache of `dtype` holds them (fp16: rounded to nearest even)."""
    return int8_rows.quantize(x) if dtype == torch.int8 else x.to(dtype)


def loaded(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A cache's rows back as values of `dtype`."""
    return int8_rows.dequantize(rows, dtype) if rows.dtype == torch.int8 else rows.to(dtype)
