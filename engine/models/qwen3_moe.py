"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, and in place of the FFN a router
and experts: each token's hidden state goes to the `num_experts_per_tok` experts its router ranks
highest (softmax over all experts, the chosen weights renormalized where `norm_topk_prob`), each
a SwiGLU FFN of `moe_intermediate_size`, and their outputs are summed with those weights.

The FFN branch the skip gate sees is that whole sum: a skipped FFN skips the router and every
expert of that token. An expert's projections are built as any projection (dense, or the GGUF's
own blocks on the CPU's quantized kernels), from one matrix per expert (the GGUF's, split by
engine/gguf_weights.py) or from transformers' [experts, rows, columns] tensors. Experts run one
after another over the rows routed to them, on the per-op path (neither backend's whole-step
decode takes these layers).
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.models.qwen3 import Qwen3Layer, Qwen3Model
from engine.quant import to_device


class Qwen3MoeLayer(Qwen3Layer):
    kind = "qwen3_moe"

    def __init__(self, cfg: ModelConfig, weights: dict, prefix: str, device, dtype, act_dtype, index: int, ops):
        self.device, self.dtype = device, dtype
        super().__init__(cfg, weights, prefix, device, dtype, act_dtype, index, ops)

    def build_ffn(self, weights: dict, prefix: str, linear) -> None:
        self.router = linear("mlp.gate.weight")
        fused = weights.get(prefix + "mlp.experts.gate_up_proj")  # transformers' layout
        down = weights.get(prefix + "mlp.experts.down_proj")
        self.experts = []
        for e in range(self.cfg.num_experts):
            if fused is not None:
                gate_up, down_e = [fused[e]], [down[e]]
            else:
                gate_up = [weights[f"{prefix}mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up")]
                down_e = [weights[f"{prefix}mlp.experts.{e}.down_proj.weight"]]
            self.experts.append((self.ops.linear([to_device(t, self.device, self.dtype) for t in gate_up]),
                                 self.ops.linear([to_device(t, self.device, self.dtype) for t in down_e])))

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        cfg, ops = self.cfg, self.ops
        x = ops.rms_norm(h, self.post_attn_norm, cfg.rms_norm_eps)
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = probs.topk(cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for expert in chosen.unique().tolist():  # ascending, as transformers sums them
            rows, slot = (chosen == expert).nonzero(as_tuple=True)
            gate_up, down = self.experts[expert]
            y = down(ops.silu_mul(gate_up(x[rows])))
            out.index_add_(0, rows, y * weights[rows, slot, None])
        return out


class Qwen3MoeModel(Qwen3Model):
    layer_class = Qwen3MoeLayer

    def weight_bytes(self) -> dict:
        """Per decoded token: the router's and, on average, `num_experts_per_tok` experts' bytes."""
        share = self.cfg.num_experts_per_tok / self.cfg.num_experts
        ffn = sum(layer.router.nbytes() + share * sum(g.nbytes() + d.nbytes() for g, d in layer.experts)
                  for layer in self.layers)
        return {"ffn": int(ffn),
                "attention": sum(layer.qkv.nbytes() + layer.o_proj.nbytes() for layer in self.layers),
                "lm_head": self.lm_head.nbytes()}

    def weight_formats(self) -> dict[str, str]:
        linears = [self.lm_head] + [lin for layer in self.layers
                                    for lin in (layer.qkv, layer.o_proj, layer.router, *layer.experts[0])]
        return {lin.format: lin.backend for lin in linears}
