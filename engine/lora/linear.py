"""A projection with LoRA deltas: `y = base(x)`, plus `B_s (A_s x)` for the rows of the step that use
adapter slot s, on the model's per-op path. The rows are the step's (`StepRows`, set by the runner
around a forward); a step with no adapter row never reaches this code's deltas (the backend's fused
paths run the base projections themselves), nor does a CPU decode step the native step takes (it
runs the same pairs itself: engine/backends/cpu/fused_decode.py's LoRA table). A and B are the
backend's own linear layers: on the CPU its kernels sum each output in one order whatever the rows,
so a row's bits do not depend on its batch (torch's matmul takes another path for one row than for
several)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


class StepRows:
    """The current forward's rows per adapter slot: `groups` = [(slot, row indices, or None for
    every row)], from each row's slot (0: the model's own)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.slots: list[int] = []
        self.groups: list[tuple[int, torch.Tensor | None]] = []

    def assign(self, slots: list[int]) -> None:
        self.slots, self.groups = slots, self._groups(slots)

    @contextmanager
    def narrowed(self, rows: list[int]):
        """While an FFN runs on some of the rows only (a skip gate's running rows, in order)."""
        outer = self.groups
        self.groups = self._groups([self.slots[r] for r in rows])
        try:
            yield
        finally:
            self.groups = outer

    def _groups(self, slots: list[int]) -> list[tuple[int, torch.Tensor | None]]:
        used = sorted(set(slots) - {0})
        if len(used) == 1 and 0 not in slots:
            return [(used[0], None)]
        return [(slot, torch.tensor([i for i, s in enumerate(slots) if s == slot], device=self.device))
                for slot in used]


class LoRALinear:
    """Wraps a backend's projection (any format: dense, quantized, fused row blocks); its attributes
    are the base's. `pairs[slot]` = the backend's linear layers of A [r, in] and B [out, r] (the scale
    in B), in the activations' dtype."""

    def __init__(self, base, rows: StepRows):
        self.base, self.rows = base, rows
        self.pairs: dict[int, tuple] = {}  # slot -> (A's linear layer, B's)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (a new tensor in x's dtype, the activations', as the pairs are)
        for slot, index in self.rows.groups:
            pair = self.pairs.get(slot)
            if pair is None:
                continue
            a, b = pair
            if index is None:
                y.add_(b(a(x)))
            else:
                y.index_add_(0, index, b(a(x[index])))
        return y
