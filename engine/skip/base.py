"""The narrow interface between the model and an FFN-skip policy.

Per step the runner asks the policy for a gate; the model calls `gate(layer, h, ffn)` in every
decoder layer and gets back `h + ffn(h)` for rows whose FFN runs and `h` for rows that skip it.
After the forward pass `gate.skip_counts()` reports exactly what was skipped (one host sync).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.config import SkipConfig


@dataclass(frozen=True)
class TokenSkipPlan:
    """Resolved FFN-skip settings of one request (request fields over server defaults)."""

    budget: float
    threshold: float
    warmup_tokens: int
    interleave: int


@dataclass(frozen=True)
class RowSkip:
    """What one row of a decode step may do: skip up to `max_skips` FFNs, triggered above `threshold`."""

    max_skips: int
    threshold: float


class DenseGate:
    """Every FFN runs: used for prefill, for the `none` policy and for all-dense steps."""

    # False: the gate only adds every FFN, so a backend may run all layers in one call without it.
    # Gates that decide or record something per layer set True.
    acts_per_layer = False

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def __call__(self, layer: int, h: torch.Tensor, ffn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return h + ffn(h)

    def skip_counts(self, num_rows: int) -> tuple[list[int], list[int]]:
        """-> (FFNs skipped per row, rows skipped per layer)."""
        return [0] * num_rows, [0] * self.num_layers


class SkipPolicy:
    name = "base"

    def __init__(self, config: SkipConfig, num_layers: int):
        self.config, self.num_layers = config, num_layers
        self.max_skippable = max(0, num_layers - config.cold_start - config.cold_end)

    def row_skip(self, plan: TokenSkipPlan, generated_index: int) -> RowSkip:
        """Skips allowed for the token produced at `generated_index` (0 = first generated token).

        Warm-up tokens and every `interleave`-th token after them are dense; otherwise a token may
        skip floor(budget * layers) FFNs, so the realized ratio can never exceed the budget.
        """
        dense = (
            plan.budget <= 0.0
            or generated_index < plan.warmup_tokens
            or (plan.interleave > 0 and (generated_index - plan.warmup_tokens) % plan.interleave == plan.interleave - 1)
        )
        k = 0 if dense else min(self.max_skippable, int(plan.budget * self.num_layers + 1e-9))
        return RowSkip(max_skips=k, threshold=plan.threshold)

    def make_gate(self, rows: list[RowSkip], device):
        raise NotImplementedError


def ffn_except(h: torch.Tensor, ffn: Callable[[torch.Tensor], torch.Tensor], skip: list[int]) -> torch.Tensor:
    """h + ffn(h) for the rows not in `skip` (a proper subset), h for those in it: only the running
    rows are gathered and computed (host gates, where knowing the rows costs no sync)."""
    if not skip:
        return h + ffn(h)
    skipping = set(skip)
    run = torch.tensor([r for r in range(h.shape[0]) if r not in skipping])
    rows = h.index_select(0, run)
    return h.index_copy(0, run, rows + ffn(rows))
