"""Qwen3 (dense): the Llama layout plus a per-head RMSNorm on q and k before the rotation.

Qwen3's heads are wider than hidden / heads (128 at every size), which the config's `head_dim`
carries; it has no q/k/v biases (Qwen2, which has them, is a Llama-family model as it stands).
"""
from __future__ import annotations

from engine.config import ModelConfig
from engine.models.llama import LlamaLayer, LlamaModel


class Qwen3Layer(LlamaLayer):
    kind = "qwen3"

    def __init__(self, cfg: ModelConfig, weights: dict, prefix: str, device, dtype, act_dtype, index: int, ops):
        super().__init__(cfg, weights, prefix, device, dtype, act_dtype, index, ops)
        self.q_norm = weights[prefix + "self_attn.q_norm.weight"].to(device=device, dtype=act_dtype)
        self.k_norm = weights[prefix + "self_attn.k_norm.weight"].to(device=device, dtype=act_dtype)

    def attention(self, x, rope, meta, k_cache, v_cache):
        cfg, ops = self.cfg, self.ops
        n = x.shape[0]
        qkv = self.qkv(ops.rms_norm(x, self.input_norm, cfg.rms_norm_eps))
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        cos, sin = rope
        q = ops.rotary(ops.rms_norm(q.reshape(n, cfg.num_heads, cfg.head_dim), self.q_norm, cfg.rms_norm_eps), cos, sin)
        k = ops.rotary(ops.rms_norm(k.reshape(n, cfg.num_kv_heads, cfg.head_dim), self.k_norm, cfg.rms_norm_eps),
                       cos, sin)
        v = v.view(n, cfg.num_kv_heads, cfg.head_dim)
        out = ops.attention(q, k, v, k_cache, v_cache, meta, self.scale, self.window)
        return self.o_proj(out)


class Qwen3Model(LlamaModel):
    layer_class = Qwen3Layer
