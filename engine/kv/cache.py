"""The KV cache tensors: per layer K and V of shape [num_blocks, num_kv_heads, block_size, head_dim].

Which block belongs to whom is the scheduler's business (`engine/kv/block_manager.py`); this file
only owns the memory. A block keeps a head's `block_size` keys contiguous, so a kernel streams one
block's keys (or values) for one head as a single run of memory.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 device, dtype):
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
