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

from engine.config import ModelConfig
from engine.models.llama import LlamaModel
from engine.models.rope import RotaryEmbedding
from engine.quant import to_device


class Gemma3Layer:
    kind = "gemma3"
    softcap: float | None = None  # attention scores soft-capped (Gemma 2's layer sets it)
    head_norms = True  # per-head RMSNorm on q and k (Gemma 2 has none)
    local_rope = True  # sliding-window layers rotate with a rope base of their own (Gemma 2: one for all)
    activation = "gelu_tanh"

    def __init__(self, cfg: ModelConfig, weights: dict, prefix: str, device, dtype, act_dtype, index: int, ops):
        def linear(*names):  # one fused projection from its row blocks, dense or quantized
            return ops.linear([to_device(weights[prefix + n], device, dtype) for n in names])

        def norm(name):  # (1 + w) once, in fp32, as Gemma computes it
            return weights[prefix + name].to(device=device, dtype=torch.float32) + 1.0

        self.cfg, self.ops = cfg, ops
        sliding = cfg.is_sliding(index)
        self.rope_kind = "local" if sliding and self.local_rope else "global"
        self.window = cfg.sliding_window if sliding else None
        self.input_norm, self.post_attn_norm = norm("input_layernorm.weight"), norm("post_attention_layernorm.weight")
        self.pre_ffn_norm, self.post_ffn_norm = norm("pre_feedforward_layernorm.weight"), norm("post_feedforward_layernorm.weight")
        self.q_norm, self.k_norm = (norm("self_attn.q_norm.weight"), norm("self_attn.k_norm.weight")) \
            if self.head_norms else (None, None)
        self.qkv = linear(*(f"self_attn.{p}_proj.weight" for p in "qkv"))
        self.o_proj = linear("self_attn.o_proj.weight")
        self.gate_up = linear("mlp.gate_proj.weight", "mlp.up_proj.weight")
        self.down = linear("mlp.down_proj.weight")
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

    def norm(self, x: torch.Tensor, weight_plus_one: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x.float(), weight_plus_one, self.cfg.rms_norm_eps).to(x.dtype)

    def attention(self, x, rope, meta, k_cache, v_cache) -> torch.Tensor:
        cfg, ops = self.cfg, self.ops
        n = x.shape[0]
        qkv = self.qkv(self.norm(x, self.input_norm))
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        cos, sin = rope
        q, k = q.view(n, cfg.num_heads, cfg.head_dim), k.view(n, cfg.num_kv_heads, cfg.head_dim)
        if self.head_norms:
            q, k = self.norm(q, self.q_norm), self.norm(k, self.k_norm)
        q, k = ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)
        v = v.view(n, cfg.num_kv_heads, cfg.head_dim)
        out = ops.attention(q, k, v, k_cache, v_cache, meta, self.scale, self.window, self.softcap)
        return self.norm(self.o_proj(out), self.post_attn_norm)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(self.ops.gelu_tanh_mul(self.gate_up(self.norm(h, self.pre_ffn_norm)))),
                         self.post_ffn_norm)


class Gemma3Model(LlamaModel):
    layer_class = Gemma3Layer

    def __init__(self, cfg: ModelConfig, weights: dict, device, dtype, max_len: int, ops):
        super().__init__(cfg, weights, device, dtype, max_len, ops)
        self.norm = weights["model.norm.weight"].to(device=device, dtype=torch.float32) + 1.0
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=self.act_dtype)
        if self.layer_class.local_rope:
            self.ropes["local"] = RotaryEmbedding(cfg.rotary_dim, cfg.rope_local_theta or 10000.0, None, max_len, device,
                                                  self.act_dtype)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[input_ids].to(self.act_dtype) * self.embed_scale

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x.float(), self.norm, self.cfg.rms_norm_eps).to(x.dtype)
