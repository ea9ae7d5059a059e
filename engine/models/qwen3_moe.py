"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, and in place of the FFN a router
and experts: each token's hidden state goes to the `num_experts_per_tok` experts its router ranks
highest (softmax over all experts, the chosen weights renormalized where `norm_topk_prob`), each
a SwiGLU FFN of `moe_intermediate_size`, and their outputs are summed with those weights.

The FFN branch the skip gate sees is that whole sum: a skipped FFN skips the router and every
expert of that token. An expert's projections are built as any projection (dense, or the GGUF's
own blocks on the CPU's quantized kernels), from one matrix per expert (the GGUF's, split by
engine/gguf_weights.py) or from transformers' [experts, rows, columns] tensors. Experts run one
after another over the rows routed to them (engine/models/moe.py), on the per-op path; the CUDA
decode step runs the same routing (`route`) with every chosen expert in one launch a projection
(engine/backends/cuda/masked_moe.py).
"""
from __future__ import annotations

import torch

from engine.models.moe import MixtureModel, expert_linears, mix_experts
from engine.models.qwen3 import Qwen3Layer, Qwen3Model


class Qwen3MoeLayer(Qwen3Layer):
    kind = "qwen3_moe"

    def build_ffn(self, weights: dict, prefix: str, linear) -> None:
        self.router = linear("mlp.gate.weight")
        fused = weights.get(prefix + "mlp.experts.gate_up_proj")  # transformers' layout
        if fused is None:
            self.experts = expert_linears(weights, prefix, linear, self.cfg.num_experts)
            return
        down = weights[prefix + "mlp.experts.down_proj"]
        self.experts = [(linear(fused[e]), linear(down[e])) for e in range(self.cfg.num_experts)]

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = self.ops.rms_norm(h, self.post_attn_norm, cfg.rms_norm_eps)
        weights, chosen = self.route(self.router(x))
        return mix_experts(x, chosen, weights.to(x.dtype), self.expert)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's logits [N, experts] -> (weights [N, k] fp32, chosen [N, k] expert indices):
        the k most probable experts by a softmax over all, renormalized where `norm_topk_prob`."""
        cfg = self.cfg
        weights, chosen = torch.softmax(logits.float(), dim=-1).topk(cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, chosen

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.experts[index]
        return down(self.ops.silu_mul(gate_up(x)))


class Qwen3MoeModel(MixtureModel, Qwen3Model):
    layer_class = Qwen3MoeLayer
