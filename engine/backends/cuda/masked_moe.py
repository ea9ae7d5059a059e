"""The mixture-of-experts FFN of a decode step whose rows may skip it (Qwen3-MoE, Mixtral, gpt-oss): out =
h + sum over the row's k experts of weight * expert(rmsnorm(h)) for rows that run, h for rows that
skip; no host sync, so it runs inside a CUDA graph, and no expert's weight read that no running
row chose (expert_linear.py): a skipped row routes to nothing.

The router (cuBLAS) and the routing rule (the layer's own `route`: softmax and top-k in torch) run
for every row; then two launches: every chosen expert's gate|up projection, and its down
projection with the activation computed as it loads its input and the routing weight applied as
it stores (fp32); the k slots are summed onto h in fp32. The experts' matrices are restacked into
one [experts, N, K] tensor per projection, and each expert's own linear layer made a view of it (no
second copy; the per-op path, prefill, reads the same memory): by the CUDA backend right after the
model loads (`stack_model_experts`), before the KV cache takes the card's free memory, as the
restacking holds a layer's experts twice for a moment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.backends.cuda.expert_linear import expert_linear
from engine.backends.cuda.rms_norm import rms_norm
from engine.backends.torch_backend import PlainLinear


def _stacked(parts: list) -> torch.Tensor | None:
    """The one contiguous tensor [experts, ...] whose rows `parts` are, in order and as laid out
    there (not, say, their transposes), or None."""
    base = None if parts[0] is None else parts[0]._base
    if base is None or base.shape[0] != len(parts) or not base.is_contiguous():
        return None
    return base if all(p is not None and p._base is base and p.data_ptr() == base[e].data_ptr()
                       and p.shape == base.shape[1:] and p.stride() == base.stride()[1:]
                       for e, p in enumerate(parts)) else None


def stack_experts(linears: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The experts' projections (PlainLinear, one shape) -> (weights [experts, N, K], biases
    [experts, N] or None), each linear's weight and bias rebound to a view of them; where they are
    views of such tensors already, those tensors."""
    weight, bias = _stacked([lin.weight for lin in linears]), _stacked([lin.bias for lin in linears])
    if weight is None:
        weight = torch.stack([lin.weight for lin in linears])
        for e, lin in enumerate(linears):
            lin.weight = weight[e]
    if bias is None and all(lin.bias is not None for lin in linears):
        bias = torch.stack([lin.bias for lin in linears])
        for e, lin in enumerate(linears):
            lin.bias = bias[e]
    return weight, bias


def stack_model_experts(model) -> None:
    """Every mixture layer's dense experts restacked (stack_experts), a layer at a time."""
    for layer in model.layers:
        experts = getattr(layer, "experts", None)
        if experts and all(isinstance(lin, PlainLinear) for pair in experts for lin in pair):
            for part in range(2):
                stack_experts([pair[part] for pair in experts])


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
