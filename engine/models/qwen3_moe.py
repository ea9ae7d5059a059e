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

from engine.models.qwen3 import Qwen3Layer, Qwen3Model


class Qwen3MoeLayer(Qwen3Layer):
    kind = "qwen3_moe"

    def build_ffn(self, weights: dict, prefix: str, linear) -> None:
        self.router = linear("mlp.gate.weight")
        fused = weights.get(prefix + "mlp.experts.gate_up_proj")  # transformers' layout
        down = weights.get(prefix + "mlp.experts.down_proj")
        self.experts = []
        for e in range(self.cfg.num_experts):
            if fused is not None:
                self.experts.append((linear(fused[e]), linear(down[e])))
            else:
                self.experts.append((linear(*(f"mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up"))),
                                     linear(f"mlp.experts.{e}.down_proj.weight")))

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

    def ffn_linears(self, layer) -> list:
        return [layer.router] + [lin for expert in layer.experts for lin in expert]

    def ffn_bytes(self, layer) -> float:
        """The router's and, on average, `num_experts_per_tok` experts' bytes."""
        share = self.cfg.num_experts_per_tok / self.cfg.num_experts
        return layer.router.nbytes() + share * sum(g.nbytes() + d.nbytes() for g, d in layer.experts)
