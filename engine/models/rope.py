"""Rotary position embeddings (HF `rotate_half` layout) with default, linear, llama3, longrope
(Phi-3) and YaRN (gpt-oss; Qwen's long-context configs) scaling.

longrope: per-dimension factors, one set for sequences within the pretrained length and one for
longer ones, and cos/sin scaled by sqrt(1 + ln(factor) / ln(pretrained length)). transformers
switches sets by the current sequence's length; here, as llama.cpp decides it by its context
size, the server's longest sequence (`max_len`) picks one set for every position: the short one
while max_len is within the pretrained length (transformers' choice for every such sequence).

YaRN: frequencies that turn fewer than `beta_slow` times over the pretrained length are divided by
`factor`, those that turn more than `beta_fast` times are kept, a linear ramp between; cos and sin
scaled by 0.1 ln(factor) + 1 (or the config's `attention_factor`), as transformers computes it."""
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
    if kind == "yarn":
        return yarn_frequencies(inv_freq, head_dim, theta, scaling)
    raise ValueError(f"unsupported rope scaling {kind!r}")


def yarn_frequencies(inv_freq: torch.Tensor, dim: int, theta: float, scaling: dict) -> torch.Tensor:
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def dimension(turns: float) -> float:  # the dimension whose frequency turns `turns` times over the pretrained length
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(scaling.get("beta_fast") or 32), dimension(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low if high > low else 0.001)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def attention_factor(scaling: dict | None) -> float:
    """What cos and sin are multiplied by (longrope's and YaRN's; 1 for the others)."""
    if not scaling or scaling["rope_type"] not in ("longrope", "yarn"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if scaling["rope_type"] == "yarn":
        factor, mscale, all_dims = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")

        def scaled(m: float = 1.0) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        return scaled(mscale) / scaled(all_dims) if mscale and all_dims else scaled()
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
