"""gpt-oss (gpt-oss-20b, gpt-oss-120b): a mixture of experts whose layer differs from Llama's in

- attention: biases on q, k, v and o; a learned sink per head, a logit that joins each query's
  softmax with no value (its share of the probability goes nowhere); every other layer (the even
  ones) attends over a sliding window of 128 tokens; YaRN rope (engine/models/rope.py);
- the FFN: a router with a bias picks `num_experts_per_tok` experts by their logits and weighs
  them by a softmax over the chosen logits alone; each expert is a clamped SwiGLU with biases,
  gate g <= limit, up u in [-limit, limit], out = down((u + 1) * g * sigmoid(alpha * g)).

The FFN branch the skip gate sees is that whole mixture, as for Qwen3-MoE. Experts come from one
matrix per expert (a GGUF's stacks, split by engine/gguf_weights.py; MXFP4 on the CPU's 4-bit
table kernels) or from transformers' [experts, in, out] tensors with gate and up interleaved.
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.models.llama import LlamaLayer, LlamaModel
from engine.models.moe import MixtureModel, expert_linears, mix_experts


class GptOssLayer(LlamaLayer):
    kind = "gpt_oss"
    activation = "swiglu_clamped"  # the experts' (`expert` below), as the CUDA decode step's kernels name it
    renormalized = True  # `route`'s softmax over the chosen logits: their shares of one over all, renormalized

    def __init__(self, cfg: ModelConfig, weights: dict, prefix: str, device, dtype, act_dtype, index: int, ops):
        super().__init__(cfg, weights, prefix, device, dtype, act_dtype, index, ops)
        if cfg.is_sliding(index):
            self.window = cfg.sliding_window
        self.sinks = weights[prefix + "self_attn.sinks"].to(device=device, dtype=torch.float32)

    def build_ffn(self, weights: dict, prefix: str, linear) -> None:
        self.router = linear("mlp.router.weight", bias=weights[prefix + "mlp.router.bias"])
        fused = weights.get(prefix + "mlp.experts.gate_up_proj")  # transformers' [experts, in, 2 * out] layout
        if fused is None:
            self.experts = expert_linears(weights, prefix, linear, self.cfg.num_experts)
            return
        gate_up_bias = weights[prefix + "mlp.experts.gate_up_proj_bias"]
        down, down_bias = weights[prefix + "mlp.experts.down_proj"], weights[prefix + "mlp.experts.down_proj_bias"]
        self.experts = [(linear(fused[e, :, 0::2].t(), fused[e, :, 1::2].t(),  # gate | up, de-interleaved
                               bias=torch.cat([gate_up_bias[e, 0::2], gate_up_bias[e, 1::2]])),
                         linear(down[e].t(), bias=down_bias[e]))
                        for e in range(self.cfg.num_experts)]

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = self.ops.rms_norm(h, self.post_attn_norm, cfg.rms_norm_eps)
        weights, chosen = self.route(self.router(x))
        return mix_experts(x, chosen, weights.to(x.dtype), self.expert)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's logits [N, experts] -> (weights [N, k] fp32, chosen [N, k]): the k highest
        logits, weighed by a softmax over those k alone."""
        top, chosen = logits.float().topk(self.cfg.num_experts_per_tok, dim=-1)
        return torch.softmax(top, dim=-1), chosen

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.experts[index]
        limit, alpha = self.cfg.swiglu_limit, self.cfg.swiglu_alpha
        gate, up = gate_up(x).chunk(2, dim=-1)
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return down((up + 1) * gate * torch.sigmoid(gate * alpha))

    def attend(self, q, k, v, k_cache, v_cache, meta):
        return self.ops.attention(q, k, v, k_cache, v_cache, meta, self.scale, self.window, sinks=self.sinks)


class GptOssModel(MixtureModel, LlamaModel):
    layer_class = GptOssLayer
