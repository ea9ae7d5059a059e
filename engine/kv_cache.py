"""The KV cache tensors: one contiguous slot of `max_len` tokens per running sequence.

Shape per layer: [slots, kv_heads, max_len, head_dim]. Which slot belongs to whom is the
scheduler's business (`engine/slot_manager.py`); this file only owns the memory.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 device, dtype):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots, self.max_len = num_slots, max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
