"""The int8 KV cache's rows (`--kv-cache-dtype int8`, CPU), as llama.cpp's q8_0 cache keeps them:
each head's `head_dim` values as int8 in groups of 32, each group with an fp32 scale (absmax / 127,
values rounded to nearest even), the scales after the values in the same row. A row is
head_dim + 4 * head_dim / 32 bytes: 0.56x an fp16 row, so decode attention over long contexts
reads about half the bytes. The native decode attention (engine/native/decode_attention.cpp, `q8`)
writes the rows it decodes bit for bit as `quantize` writes a prefill's.
"""
from __future__ import annotations

import torch

GROUP = 32  # values per scale


def supported(head_dim: int) -> bool:
    return head_dim % GROUP == 0


def row_bytes(head_dim: int) -> int:
    return head_dim + 4 * (head_dim // GROUP)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] float -> [..., row_bytes] int8."""
    dim = x.shape[-1]
    groups = x.float().reshape(*x.shape[:-1], dim // GROUP, GROUP)
    scale = groups.abs().amax(-1, keepdim=True) / 127.0
    values = torch.where(scale > 0, groups / scale, torch.zeros_like(groups)).round().clamp(-127, 127)
    values = values.to(torch.int8).reshape(*x.shape[:-1], dim)
    scales = scale.reshape(*x.shape[:-1], dim // GROUP).contiguous().view(torch.int8)
    return torch.cat([values, scales], dim=-1)


def dequantize(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., row_bytes] int8 -> [..., head_dim] `dtype`."""
    dim = rows.shape[-1] * GROUP // (GROUP + 4)
    values = rows[..., :dim].to(torch.float32).reshape(*rows.shape[:-1], dim // GROUP, GROUP)
    scales = rows[..., dim:].contiguous().view(torch.float32).unsqueeze(-1)
    return (values * scales).reshape(*rows.shape[:-1], dim).to(dtype)
