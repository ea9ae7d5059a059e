"""The Llama-family FFN of a decode step whose rows may skip it, on the masked kernels:
out = h + down(act(gate_up(rmsnorm(h)))) for rows that run, out = h for rows that skip, and not
one weight byte read when no row runs (masked_linear.py). Two launches: the gate|up projection,
then the down projection with the activation computed as it loads its input."""
from __future__ import annotations

import torch

from engine.backends.cuda.masked_linear import masked_linear
from engine.backends.cuda.rms_norm import rms_norm


class MaskedFFN:
    def __init__(self, norm_weight: torch.Tensor, eps: float, gate_up_weight: torch.Tensor,
                 down_weight: torch.Tensor, activation: str = "silu"):
        """gate_up_weight: [2 * inter, hidden] (gate rows, then up rows); down_weight: [hidden, inter]."""
        self.norm_weight, self.eps = norm_weight, eps
        self.gate_up_weight, self.down_weight = gate_up_weight, down_weight
        self.activation = activation

    def __call__(self, h: torch.Tensor, run: torch.Tensor | None = None, normed: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """h: [rows, hidden]; run: [rows] device mask (None = every row runs); normed: rmsnorm(h)
        where the caller has it already (fused with the residual add) -> out [rows, hidden]."""
        normed = rms_norm(h, self.norm_weight, self.eps) if normed is None else normed
        gate_up = masked_linear(normed, self.gate_up_weight, run)
        return masked_linear(gate_up, self.down_weight, run, residual=h, activation=self.activation)
