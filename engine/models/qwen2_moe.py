"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases), and in place of
the FFN the softmax-routed experts Qwen3-MoE has (engine/models/moe.py's SoftmaxRoutedExperts; the
chosen weights not renormalized unless `norm_topk_prob`) plus a shared expert every token runs, a
SwiGLU FFN of `shared_expert_intermediate_size` scaled by sigmoid(shared_expert_gate(x)) before
it joins the experts' sum. The FFN branch the skip gate sees is that whole sum. It decodes on the
per-op path on CUDA (the CUDA decode step's kernels have no shared expert); on the CPU it decodes in
the native step (engine/native/routed_experts.cpp runs the shared expert too).
"""
from __future__ import annotations

import torch

from engine.models.llama import LlamaLayer, LlamaModel
from engine.models.moe import MixtureModel, SoftmaxRoutedExperts


class Qwen2MoeLayer(SoftmaxRoutedExperts, LlamaLayer):
    kind = "qwen2_moe"

    def build_ffn(self, weights: dict, prefix: str, linear) -> None:
        super().build_ffn(weights, prefix, linear)
        stem = "mlp.shared_expert."
        self.shared = (linear(stem + "gate_proj.weight", stem + "up_proj.weight"), linear(stem + "down_proj.weight"))
        # [1, hidden] (a GGUF holds it as [hidden])
        self.shared_gate = linear(weights[prefix + "mlp.shared_expert_gate.weight"].reshape(1, -1))

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        x = self.ops.rms_norm(h, self.post_attn_norm, self.cfg.rms_norm_eps)
        gate_up, down = self.shared
        return self.routed(x) + torch.sigmoid(self.shared_gate(x)) * down(self.ops.silu_mul(gate_up(x)))


class Qwen2MoeModel(MixtureModel, LlamaModel):
    layer_class = Qwen2MoeLayer

    def ffn_linears(self, layer) -> list:
        return super().ffn_linears(layer) + [*layer.shared, layer.shared_gate]

    def ffn_bytes(self, layer) -> float:
        """The router's, the chosen share of the experts' and the whole shared expert's bytes."""
        return super().ffn_bytes(layer) + sum(lin.nbytes() for lin in (*layer.shared, layer.shared_gate))
