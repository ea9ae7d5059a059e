"""The mixture-of-experts FFN of a decode step whose rows may skip it (Qwen3-MoE, gpt-oss): out =
h + sum over the row's k experts of weight * expert(rmsnorm(h)) for rows that run, h for rows that
skip; no host sync, so it runs inside a CUDA graph, and no expert's weight read that no running
row chose (expert_linear.py): a skipped row routes to nothing.

The router (cuBLAS) and the routing rule (the layer's own `route`: softmax and top-k in torch) run
for every row; then two launches: every chosen expert's gate|up projection, and its down
projection with the activation computed as it loads its input and the routing weight applied as
it stores (fp32); the k slots are summed onto h in fp32. The experts' matrices are restacked at
construction into one [experts, N, K] tensor per projection, and each expert's own linear layer
made a view of it (no second copy; the per-op path, prefill, reads the same memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.backends.cuda.expert_linear import expert_linear
from engine.backends.cuda.rms_norm import rms_norm


def stack_experts(linears: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The experts' projections (PlainLinear, one shape) -> (weights [experts, N, K], biases
    [experts, N] or None), each linear's weight and bias rebound to a view of them."""
    weight = torch.stack([lin.weight for lin in linears])
    bias = torch.stack([lin.bias for lin in linears]) if all(lin.bias is not None for lin in linears) else None
    for e, lin in enumerate(linears):
        lin.weight = weight[e]
        if bias is not None:
            lin.bias = bias[e]
    return weight, bias


class MaskedMoE:
    def __init__(self, layer, norm_weight: torch.Tensor, eps: float):
        """layer: a mixture layer (`router`, `experts` [(gate_up, down)], `route`, `activation`)."""
        self.norm_weight, self.eps = norm_weight, eps
        self.router, self.route, self.activation = layer.router, layer.route, layer.activation
        self.gate_up_weight, self.gate_up_bias = stack_experts([gate_up for gate_up, _ in layer.experts])
        self.down_weight, self.down_bias = stack_experts([down for _, down in layer.experts])
        cfg = layer.cfg
        self.limit, self.alpha = (cfg.swiglu_limit, cfg.swiglu_alpha) if self.activation == "swiglu_clamped" else (0, 0)

    def __call__(self, h: torch.Tensor, run: torch.Tensor | None = None, normed: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """h: [rows, hidden]; run: [rows] device mask (None = every row runs); normed: rmsnorm(h)
        where the caller has it already -> out [rows, hidden]."""
        normed = rms_norm(h, self.norm_weight, self.eps) if normed is None else normed
        weights, chosen = self.route(F.linear(normed, self.router.weight, self.router.bias))
        gate_up = expert_linear(normed, self.gate_up_weight, chosen, run, self.gate_up_bias)
        mixed = expert_linear(gate_up, self.down_weight, chosen, run, self.down_bias, scale=weights,
                              activation=self.activation, limit=self.limit, alpha=self.alpha,
                              out_dtype=torch.float32)  # [rows, k, hidden]; a skipped row's unwritten
        out = (h.float() + mixed.sum(1)).to(h.dtype)
        return out if run is None else torch.where(run[:, None] != 0, out, h)
