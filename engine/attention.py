"""Attention over the slot KV cache, and the per-step metadata that drives it.

The cache holds one contiguous slot per running sequence (`engine/kv_cache.py`). A decode
step writes each row's new K/V in place and attends over a strided *view* of the slots:
no row's history is gathered or copied, so a step costs attention compute only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.native import ops as native_ops


@dataclass
class AttentionMetadata:
    """Everything a forward pass needs to know about where its tokens sit in the cache."""

    positions: torch.Tensor  # [N] absolute position of each token
    is_prefill: bool
    # prefill: N tokens of one sequence, written at slot_id, positions start..start+N-1
    slot_id: int = 0
    start: int = 0
    # decode: one token per row
    slot_ids: torch.Tensor | None = None  # [B] slot of each row
    num_slots_view: int = 0  # S: rows of the slot view (max slot id + 1)
    context_len: int = 0  # L: longest context in the batch, incl. the new token
    slots_are_rows: bool = False  # slot_ids == arange(B): no scatter of queries needed
    slot_lengths: torch.Tensor | None = None  # [S] context length per slot of the view (0 = unused)
    row_lengths: torch.Tensor | None = None  # [B] context length per row, incl. the new token
    dtype: torch.dtype = torch.float32
    segments: list["AttentionMetadata"] | None = None  # prefill of several sequences in one forward
    _masks: dict = field(default_factory=dict)  # window -> mask, built once per step

    @classmethod
    def for_prefill(cls, slot_id: int, start: int, num_tokens: int, device) -> "AttentionMetadata":
        positions = torch.arange(start, start + num_tokens, device=device)
        return cls(positions=positions, is_prefill=True, slot_id=slot_id, start=start)

    @classmethod
    def for_prefills(cls, chunks: list[tuple[int, int, int]], device) -> "AttentionMetadata":
        """Prefill chunks (slot, start, num_tokens) of several sequences, concatenated in one forward:
        the projections and FFNs run on all their tokens at once, attention per sequence."""
        if len(chunks) == 1:
            return cls.for_prefill(*chunks[0], device)
        segments = [cls.for_prefill(slot, start, n, device) for slot, start, n in chunks]
        return cls(positions=torch.cat([m.positions for m in segments]), is_prefill=True, segments=segments)

    @classmethod
    def for_decode(cls, slot_ids: list[int], positions: list[int], device, dtype) -> "AttentionMetadata":
        num_slots = max(slot_ids) + 1
        lengths = torch.zeros(num_slots, dtype=torch.long)
        row_lengths = torch.tensor(positions) + 1
        lengths[slot_ids] = row_lengths
        return cls(
            positions=torch.tensor(positions, device=device),
            is_prefill=False,
            slot_ids=torch.tensor(slot_ids, device=device),
            num_slots_view=num_slots,
            context_len=max(positions) + 1,
            slots_are_rows=slot_ids == list(range(len(slot_ids))),
            slot_lengths=lengths.to(device),
            row_lengths=row_lengths.to(device),
            dtype=dtype,
        )

    def mask(self, window: int | None) -> torch.Tensor:
        """Prefill: [N, start+N] bool (True = attend). Decode: [S, 1, 1, L] additive (0 / -inf).
        `window`: attend only to the last `window` positions (sliding-window layers)."""
        if window not in self._masks:
            self._masks[window] = self._prefill_mask(window) if self.is_prefill else self._decode_mask(window)
        return self._masks[window]

    def _prefill_mask(self, window):
        keys = torch.arange(self.start + len(self.positions), device=self.positions.device)
        distance = self.positions[:, None] - keys[None, :]
        allowed = distance >= 0
        return allowed & (distance < window) if window else allowed

    def _decode_mask(self, window):
        keys = torch.arange(self.context_len, device=self.slot_lengths.device)[None, :]
        lengths = self.slot_lengths[:, None]
        blocked = keys >= lengths
        if window:
            blocked |= keys < lengths - window
        mask = torch.zeros(blocked.shape, dtype=self.dtype, device=blocked.device)
        return mask.masked_fill_(blocked, float("-inf"))[:, None, None, :]


def attend(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None):
    """q: [N, H, D]; k, v: [N, KV, D]; caches: [slots, KV, max_len, D] of one layer -> [N, H*D]."""
    if meta.segments:
        sizes = [len(m.positions) for m in meta.segments]
        return torch.cat([_prefill(qs, ks, vs, k_cache, v_cache, m, scale, window) for m, qs, ks, vs
                          in zip(meta.segments, q.split(sizes), k.split(sizes), v.split(sizes))])
    if meta.is_prefill:
        return _prefill(q, k, v, k_cache, v_cache, meta, scale, window)
    return _decode(q, k, v, k_cache, v_cache, meta, scale, window)


def _prefill(q, k, v, k_cache, v_cache, meta, scale, window):
    n, num_heads, head_dim = q.shape
    end = meta.start + n
    k_cache[meta.slot_id, :, meta.start:end] = k.transpose(0, 1)
    v_cache[meta.slot_id, :, meta.start:end] = v.transpose(0, 1)
    keys = k_cache[meta.slot_id, :, :end].unsqueeze(0)
    values = v_cache[meta.slot_id, :, :end].unsqueeze(0)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys, values,
        attn_mask=meta.mask(window), scale=scale, enable_gqa=True,
    )  # [1, H, N, D]
    return out[0].transpose(0, 1).reshape(n, num_heads * head_dim)


def _decode(q, k, v, k_cache, v_cache, meta, scale, window):
    rows, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    if native_ops.decode_attention_supported(q, k_cache):  # writes k, v into the cache itself
        return native_ops.decode_attention(q, k, v, k_cache, v_cache, meta.slot_ids, meta.row_lengths,
                                           meta.context_len, scale, window)
    k_cache[meta.slot_ids, :, meta.positions] = k
    v_cache[meta.slot_ids, :, meta.positions] = v
    slots, length = meta.num_slots_view, meta.context_len
    keys = k_cache[:slots, :, :length]  # [S, KV, L, D] strided view, no copy
    values = v_cache[:slots, :, :length]
    q = q.view(rows, num_kv, group, head_dim)
    if not meta.slots_are_rows:  # (slots_are_rows implies slots == rows)
        q = q.new_zeros(slots, num_kv, group, head_dim).index_copy_(0, meta.slot_ids, q)
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale).add_(meta.mask(window))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.matmul(probs, values)  # [S, KV, G, D]
    if not meta.slots_are_rows:
        out = out.index_select(0, meta.slot_ids)
    return out.reshape(rows, num_heads * head_dim)
