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
    sum over each row's k experts of weight * expert(index, x of the rows routed to it).

    The routing is read to the host once; an expert every row chose (at batch 1, each of them)
    takes x as it is and adds to `out` in place, with no gather or scatter (the same arithmetic:
    each row's sum gets one product an expert)."""
    out = torch.zeros_like(x)
    routed: dict[int, tuple[list[int], list[int]]] = {}  # expert -> (rows, slots), rows ascending
    for row, picks in enumerate(chosen.tolist()):
        for slot, index in enumerate(picks):
            rows, slots = routed.setdefault(index, ([], []))
            rows.append(row)
            slots.append(slot)
    everyone = list(range(x.shape[0]))
    for index in sorted(routed):
        rows, slots = routed[index]
        if rows == everyone:
            scale = weights[:, slots[0], None] if len(set(slots)) == 1 else \
                weights.gather(1, torch.tensor(slots, device=x.device)[:, None])
            out += expert(index, x) * scale
        else:
            at = torch.tensor(rows, device=x.device)
            out.index_add_(0, at, expert(index, x[at]) * weights[at, torch.tensor(slots, device=x.device), None])
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


class SoftmaxRoutedExperts:
    """A layer mixin (before the attention's layer class): in place of the FFN a router and SwiGLU
    experts, each token sent to the `num_experts_per_tok` experts its router ranks highest by a
    softmax over all of them, the chosen weights renormalized where `norm_topk_prob` (always, for
    Mixtral). Qwen3-MoE's, Mixtral's and Qwen2-MoE's (beside its shared expert). Read from transformers' [experts, rows, columns] tensors,
    Mixtral's Hub checkpoints (`block_sparse_moe`, w1 / w3 / w2), or one matrix per expert (a GGUF's
    stacks, as engine/gguf_weights.py splits them)."""

    def build_ffn(self, weights: dict, prefix: str, linear) -> None:
        count = self.cfg.num_experts
        if prefix + "block_sparse_moe.gate.weight" in weights:  # Mixtral's own checkpoints
            stem = "block_sparse_moe.experts"
            self.router = linear("block_sparse_moe.gate.weight")
            self.experts = [(linear(f"{stem}.{e}.w1.weight", f"{stem}.{e}.w3.weight"), linear(f"{stem}.{e}.w2.weight"))
                            for e in range(count)]
            return
        self.router = linear("mlp.gate.weight")
        fused = weights.get(prefix + "mlp.experts.gate_up_proj")  # transformers' layout
        if fused is None:
            self.experts = expert_linears(weights, prefix, linear, count)
            return
        down = weights[prefix + "mlp.experts.down_proj"]
        self.experts = [(linear(fused[e]), linear(down[e])) for e in range(count)]

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.routed(self.ops.rms_norm(h, self.post_attn_norm, self.cfg.rms_norm_eps))

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum for the FFN's input x (normed)."""
        weights, chosen = self.route(self.router(x))
        return mix_experts(x, chosen, weights.to(x.dtype), self.expert)

    @property
    def renormalized(self) -> bool:
        """Whether the chosen experts' weights are renormalized to sum to 1 (`route`)."""
        return self.cfg.norm_topk_prob

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's logits [N, experts] -> (weights [N, k] fp32, chosen [N, k] expert indices)."""
        weights, chosen = torch.softmax(logits.float(), dim=-1).topk(self.cfg.num_experts_per_tok, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, chosen

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.experts[index]
        return down(self.ops.silu_mul(gate_up(x)))


class MixtureModel:
    """A model mixin for layers with a `router` and `experts` [(gate_up, down)] in place of an FFN."""

    def ffn_linears(self, layer) -> list:
        return [layer.router] + [lin for expert in layer.experts for lin in expert]

    def ffn_bytes(self, layer) -> float:
        """The router's and, on average, `num_experts_per_tok` experts' bytes."""
        share = self.cfg.num_experts_per_tok / self.cfg.num_experts
        return layer.router.nbytes() + share * sum(g.nbytes() + d.nbytes() for g, d in layer.experts)
