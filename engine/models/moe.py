"""What the mixture-of-experts layers share: each token's chosen experts run over the rows routed to
them, one expert after another, and their outputs join the token's sum with its routing weight.

Experts run in ascending order, as transformers sums them, so a token's sum adds its experts'
outputs in the same order there and here.
"""
from __future__ import annotations

from typing import Callable

import torch


def mix_experts(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x [N, hidden]; chosen [N, k] expert indices and weights [N, k] (x's dtype) -> [N, hidden]:
    sum over each row's k experts of weight * expert(index, x of the rows routed to it)."""
    out = torch.zeros_like(x)
    for index in chosen.unique().tolist():
        rows, slot = (chosen == index).nonzero(as_tuple=True)
        out.index_add_(0, rows, expert(index, x[rows]) * weights[rows, slot, None])
    return out


def expert_linears(weights: dict, prefix: str, linear, count: int) -> list[tuple]:
    """Each expert's (gate|up, down) projections, from one matrix per expert
    (`mlp.experts.{e}.{part}_proj.weight`, as engine/gguf_weights.py splits a GGUF's stacks; biases
    beside them where the file has them)."""
    def one(e: int, parts: tuple[str, ...]):
        stem = [f"mlp.experts.{e}.{part}_proj" for part in parts]
        biases = [weights.get(f"{prefix}{s}.bias") for s in stem]
        return linear(*(f"{s}.weight" for s in stem),
                      bias=torch.cat(biases) if all(b is not None for b in biases) else None)

    return [(one(e, ("gate", "up")), one(e, ("down",))) for e in range(count)]


class MixtureModel:
    """A model mixin for layers with a `router` and `experts` [(gate_up, down)] in place of an FFN."""

    def ffn_linears(self, layer) -> list:
        return [layer.router] + [lin for expert in layer.experts for lin in expert]

    def ffn_bytes(self, layer) -> float:
        """The router's and, on average, `num_experts_per_tok` experts' bytes."""
        share = self.cfg.num_experts_per_tok / self.cfg.num_experts
        return layer.router.nbytes() + share * sum(g.nbytes() + d.nbytes() for g, d in layer.experts)
