"""The narrow interface between the model and an FFN-skip policy.

Per step the runner asks the policy for a gate; the model calls `gate(layer, h, ffn)` in every
decoder layer and gets back `h + ffn(h)` for rows whose FFN runs and `h` for rows that skip it.
After the forward pass `gate.skip_counts()` reports exactly what was skipped (one host sync).
A backend whose decode step decides on the device runs a `RuleGate`'s rule itself instead.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from engine.config import SkipConfig

# the cosine a gate reads at a hot layer with no layer before it (cold_start 0): below any threshold
# (thresholds are in [-1, 1]), so no row fires there, in every gate (Python, C++ and Triton alike)
NO_COSINE = -2.0


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


class RuleGate:
    """Base of the gates whose rule is plain data: each row's settings (`rows`) and `quorum` (None:
    every row decides on its own, FFN-SkipLLM; else the batch-aligned rule's quorum). A backend
    whose decode step makes the decisions on the device (engine/backends/cuda/decode_step.py) runs
    such a rule itself instead of calling the gate per layer, and points the gate's counts at its
    own (`count_with`); `skip_counts` then reads those, once, after the step."""

    acts_per_layer = True
    quorum: float | None = None
    # per-row state of the forward that an FFN run on some of its rows must follow (a LoRA step's
    # row -> adapter map, engine/lora/linear.py): `row_state.narrowed(rows)` while it runs; None: none
    row_state = None

    def __init__(self, rows: list[RowSkip]):
        self.rows = rows
        self._counter = None  # what ran the rule in the gate's place, if anything did

    def count_with(self, counter) -> None:
        """`counter.skip_counts(num_rows)` reports this step's skips from now on."""
        self._counter = counter

    def skip_counts(self, num_rows: int) -> tuple[list[int], list[int]]:
        """-> (FFNs skipped per row, rows skipped per layer)."""
        return self._counter.skip_counts(num_rows) if self._counter is not None else self.own_counts(num_rows)

    def own_counts(self, num_rows: int) -> tuple[list[int], list[int]]:
        raise NotImplementedError


class SkipPolicy:
    name = "base"
    quorum: float | None = None  # the rule of this policy's gates (RuleGate.quorum)

    def __init__(self, config: SkipConfig, num_layers: int):
        self.config, self.num_layers = config, num_layers
        self.max_skippable = max(0, num_layers - config.cold_start - config.cold_end)

    @property
    def may_skip(self) -> bool:
        """Whether any token may skip an FFN under this policy and its settings (the largest budget
        allows one, and a hot layer exists): where not, every step is dense."""
        return min(self.max_skippable, int(self.config.max_budget * self.num_layers + 1e-9)) > 0

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


def ffn_except(h: torch.Tensor, ffn: Callable[[torch.Tensor], torch.Tensor], skip: list[int],
               row_state=None) -> torch.Tensor:
    """h + ffn(h) for the rows not in `skip` (a proper subset), h for those in it: only the running
    rows are gathered and computed (host gates, where knowing the rows costs no sync), with
    `row_state` (RuleGate's) narrowed to them."""
    if not skip:
        return h + ffn(h)
    skipping = set(skip)
    running = [r for r in range(h.shape[0]) if r not in skipping]
    run = torch.tensor(running, device=h.device)
    rows = h.index_select(0, run)
    with nullcontext() if row_state is None else row_state.narrowed(running):
        out = rows + ffn(rows)
    return h.index_copy(0, run, out)
