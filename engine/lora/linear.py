"""A projection with LoRA deltas: `y = base(x)`, plus `B_s (A_s x)` for the rows of the step that use
adapter slot s. The rows are the step's (`StepRows`, set by the runner around a forward); a step
with no adapter row never reaches this code's deltas (the backend's fused paths run the base
projections themselves)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepRows:
    """The current forward's rows per adapter slot: (slot, row indices, or None for every row)."""
    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)


class LoRALinear:
    """Wraps a backend's projection (any format: dense, quantized, fused row blocks); its attributes
    are the base's. `pairs[slot]` = (A [r, in], B [out, r]) in the activations' dtype, the scale in B."""

    def __init__(self, base, rows: StepRows):
        self.base, self.rows = base, rows
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for slot, index in self.rows.groups:
            pair = self.pairs.get(slot)
            if pair is None:
                continue
            a, b = pair
            if index is None:
                y = y + ((x.to(a.dtype) @ a.t()) @ b.t()).to(y.dtype)
            else:
                y = y.index_add(0, index, ((x[index].to(a.dtype) @ a.t()) @ b.t()).to(y.dtype))
        return y
