"""Qwen3 (dense): the Llama layout plus a per-head RMSNorm on q and k before the rotation.

Qwen3's heads are wider than hidden / heads (128 at every size), which the config's `head_dim`
carries; it has no q/k/v biases (Qwen2, which has them, is a Llama-family model as it stands).
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.models.llama import LlamaLayer, LlamaModel


class Qwen3Layer(LlamaLayer):
    kind = "qwen3"

    def __init__(self, cfg: ModelConfig, weights: dict, prefix: str, device, dtype, act_dtype, index: int, ops):
        super().__init__(cfg, weights, prefix, device, dtype, act_dtype, index, ops)
        self.q_norm = weights[prefix + "self_attn.q_norm.weight"].to(device=device, dtype=act_dtype)
        self.k_norm = weights[prefix + "self_attn.k_norm.weight"].to(device=device, dtype=act_dtype)

    def head_norms(self, qk: torch.Tensor) -> torch.Tensor:
        heads, eps = self.cfg.num_heads, self.cfg.rms_norm_eps
        return torch.cat([self.ops.rms_norm(qk[:, :heads], self.q_norm, eps),
                          self.ops.rms_norm(qk[:, heads:], self.k_norm, eps)], dim=1)


class Qwen3Model(LlamaModel):
    layer_class = Qwen3Layer
