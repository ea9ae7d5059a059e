"""Gemma 3 (text): the Llama layout plus what Gemma changes.

- RMSNorm scales by (1 + w), computed in fp32; four norms per layer: the attention and FFN
  outputs are normed before they join the residual, so the FFN branch the gate sees is
  post_ffn_norm(mlp(pre_ffn_norm(h))) and a skipped FFN still gives out = h;
- per-head RMSNorm on q and k; queries scaled by query_pre_attn_scalar^-0.5;
- 5 of 6 layers attend over a sliding window with their own rope base; GELU-tanh MLP;
- embeddings scaled by sqrt(hidden_size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention import attend
from engine.config import ModelConfig
from engine.models.quant_linear import make_linear
from engine.models.llama import LlamaModel, rms_norm
from engine.models.rope import RotaryEmbedding, apply_rotary


def gemma_norm(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x.float(), weight_plus_one, eps).to(x.dtype)


class Gemma3Layer:
    def __init__(self, cfg: ModelConfig, weights: dict, prefix: str, device, dtype, act_dtype, index: int):
        def norm(name):  # (1 + w) once, in fp32, as Gemma computes it
            return weights[prefix + name].to(device=device, dtype=torch.float32) + 1.0

        self.cfg = cfg
        sliding = cfg.layer_types is not None and cfg.layer_types[index] == "sliding_attention"
        self.rope_kind = "local" if sliding else "global"
        self.window = cfg.sliding_window if sliding else None
        self.input_norm, self.post_attn_norm = norm("input_layernorm.weight"), norm("post_attention_layernorm.weight")
        self.pre_ffn_norm, self.post_ffn_norm = norm("pre_feedforward_layernorm.weight"), norm("post_feedforward_layernorm.weight")
        self.q_norm, self.k_norm = norm("self_attn.q_norm.weight"), norm("self_attn.k_norm.weight")

        def linear(*names):  # dense or quantized (engine/models/quant_linear.py)
            return make_linear([weights[prefix + n] for n in names], None, device, dtype)

        self.qkv = linear(*(f"self_attn.{p}_proj.weight" for p in "qkv"))
        self.o_proj = linear("self_attn.o_proj.weight")
        self.gate_up = linear("mlp.gate_proj.weight", "mlp.up_proj.weight")
        self.down = linear("mlp.down_proj.weight")
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

    def attention(self, x, rope, meta, k_cache, v_cache) -> torch.Tensor:
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        n = x.shape[0]
        qkv = self.qkv(gemma_norm(x, self.input_norm, eps))
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        cos, sin = rope
        q = apply_rotary(gemma_norm(q.view(n, cfg.num_heads, cfg.head_dim), self.q_norm, eps), cos, sin)
        k = apply_rotary(gemma_norm(k.view(n, cfg.num_kv_heads, cfg.head_dim), self.k_norm, eps), cos, sin)
        v = v.view(n, cfg.num_kv_heads, cfg.head_dim)
        out = attend(q, k, v, k_cache, v_cache, meta, self.scale, self.window)
        return gemma_norm(self.o_proj(out), self.post_attn_norm, eps)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        gate, up = self.gate_up(gemma_norm(h, self.pre_ffn_norm, eps)).chunk(2, -1)
        return gemma_norm(self.down(F.gelu(gate, approximate="tanh") * up), self.post_ffn_norm, eps)


class Gemma3Model(LlamaModel):
    layer_class = Gemma3Layer

    def __init__(self, cfg: ModelConfig, weights: dict, device, dtype, max_len: int):
        super().__init__(cfg, weights, device, dtype, max_len)
        self.norm = weights["model.norm.weight"].to(device=device, dtype=torch.float32) + 1.0
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=self.act_dtype)
        self.ropes["local"] = RotaryEmbedding(cfg.head_dim, cfg.rope_local_theta or 10000.0, None, max_len, device,
                                              self.act_dtype)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[input_ids].to(self.act_dtype) * self.embed_scale

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return gemma_norm(x, self.norm, self.cfg.rms_norm_eps)
