"""Rotary position embeddings (HF `rotate_half` layout) with default, linear, llama3 and longrope
(Phi-3) scaling.

longrope: per-dimension factors, one set for sequences within the pretrained length and one for
longer ones, and cos/sin scaled by sqrt(1 + ln(factor) / ln(pretrained length)). transformers
switches sets by the current sequence's length; here, as llama.cpp decides it by its context
size, the server's longest sequence (`max_len`) picks one set for every position: the short one
while max_len is within the pretrained length (transformers' choice for every such sequence)."""
from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None, max_len: int = 0) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "longrope":
        long = max_len > scaling["original_max_position_embeddings"]
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"longrope: {factors.numel()} factors for {inv_freq.numel()} rotary frequencies")
        return inv_freq / factors
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r}")


def attention_factor(scaling: dict | None) -> float:
    """What cos and sin are multiplied by (longrope's; 1 for the others)."""
    if not scaling or scaling["rope_type"] != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or (scaling.get("max_position_embeddings") or original) / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class RotaryEmbedding:
    """cos and sin tables [max_len, rotary_dim] (the rotated width: a head's, or its leading part)."""

    def __init__(self, rotary_dim: int, theta: float, scaling: dict | None, max_len: int, device, dtype):
        inv_freq = inverse_frequencies(rotary_dim, theta, scaling, max_len).float()
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        scale = attention_factor(scaling)
        self.cos = (angles.cos() * scale).to(device=device, dtype=dtype)
        self.sin = (angles.sin() * scale).to(device=device, dtype=dtype)

    def __call__(self, positions: torch.Tensor):
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [N, 1, D]
