"""The FFN of a decode step whose rows may skip it, on the masked kernels: out = h + FFN(h) for
rows that run, out = h for rows that skip, and not one weight byte read when no row runs
(masked_linear.py). FFN(h) = down(act(gate_up(rmsnorm(h)))), and for Gemma rmsnorm of that (its
post-FFN norm). Two launches: the gate|up projection, then the down projection with the activation
computed as it loads its input and the residual added as it stores (Gemma: a third, the post-norm
and the residual add, which leaves h as it is on the down projection's zero rows)."""
from __future__ import annotations

import torch

from engine.backends.cuda.masked_linear import masked_linear
from engine.backends.cuda.rms_norm import norm_add, rms_norm


class MaskedFFN:
    def __init__(self, norm_weight: torch.Tensor, eps: float, gate_up_weight: torch.Tensor,
                 down_weight: torch.Tensor, activation: str = "silu", out_norm_weight: torch.Tensor | None = None):
        """gate_up_weight: [2 * inter, hidden] (gate rows, then up rows); down_weight: [hidden, inter];
        out_norm_weight: Gemma's post-FFN norm (None: the down projection joins the residual as it is)."""
        self.norm_weight, self.eps = norm_weight, eps
        self.gate_up_weight, self.down_weight = gate_up_weight, down_weight
        self.activation, self.out_norm_weight = activation, out_norm_weight

    def __call__(self, h: torch.Tensor, run: torch.Tensor | None = None, normed: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """h: [rows, hidden]; run: [rows] device mask (None = every row runs); normed: rmsnorm(h)
        where the caller has it already (fused with the residual add) -> out [rows, hidden]."""
        normed = rms_norm(h, self.norm_weight, self.eps) if normed is None else normed
        gate_up = masked_linear(normed, self.gate_up_weight, run)
        if self.out_norm_weight is None:
            return masked_linear(gate_up, self.down_weight, run, residual=h, activation=self.activation)
        down = masked_linear(gate_up, self.down_weight, run, activation=self.activation)  # zeros where skipped
        return norm_add(down, self.out_norm_weight, h, self.eps)
