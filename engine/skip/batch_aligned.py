"""Batch-aligned FFN skipping: the rows of a decode step that have a budget skip the same layers.

At batch > 1 a layer's FFN weights are read if any row runs it, so per-row decisions
(ffn_skipllm.py) that pick different layers save little time (SkipDecode's observation). Here the
trigger is shared: at each non-cold layer, until the batch has fired, every row with a budget
votes with FFN-SkipLLM's own test (cos of the previous layer's pre- vs post-FFN residual above its
threshold); when at least `quorum` of them vote (votes * 1000 >= quorum_per_mille * budgeted
rows), all of them start skipping there, each for its own `max_skips` FFNs (stopping at the cold
end). Rows with budget 0 are never skipped, and the batch fires at most once per token.

A row may so skip a layer its own cosine did not ask for (or keep one it did): that is the
quality trade-off, measured with bench/quality.py against the per-row rule at equal realized
skip. With one budgeted row the rule is exactly the per-row rule. The CUDA backend runs the same
rule on the device (engine/backends/cuda/device_gate.py with a quorum); this gate decides on the
host, which costs nothing on the CPU, and computes only the rows that run (on CUDA it serves the
per-op path, e.g. Gemma 3, at a host sync per layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.skip.base import NO_COSINE, DenseGate, RowSkip, RuleGate, SkipPolicy, ffn_except

DEFAULT_QUORUM = 0.5


def quorum_reached(votes: int, budgeted: int, quorum_per_mille: int) -> bool:
    """Integer arithmetic, so the host and the device kernel agree at every boundary."""
    return budgeted > 0 and votes * 1000 >= quorum_per_mille * budgeted


class BatchAlignedGate(RuleGate):
    def __init__(self, rows: list[RowSkip], num_layers: int, cold_start: int, cold_end: int, quorum: float):
        super().__init__(rows)
        self.quorum = quorum
        self.num_layers = num_layers
        self.first_hot, self.last_hot = cold_start, num_layers - cold_end - 1
        self.quorum_per_mille = round(quorum * 1000)
        self.max_skips = [r.max_skips for r in rows]
        self.threshold = [r.threshold for r in rows]
        self.budgeted = [i for i, r in enumerate(rows) if r.max_skips > 0]
        self.fired = not self.budgeted  # nothing to fire without a budgeted row
        self.remaining = [0] * len(rows)
        self.prev_cos: list[float] | None = None  # budgeted rows' cos of the previous layer
        self.row_skipped = [0] * len(rows)
        self.layer_skipped = [0] * num_layers

    def __call__(self, layer, h, ffn):
        if layer < self.first_hot or layer > self.last_hot:
            out = h + ffn(h)
            if layer == self.first_hot - 1:
                self._record_cos(h, out)
            return out
        if not self.fired:
            cos = self.prev_cos or [NO_COSINE] * len(self.budgeted)  # no earlier layer: nothing fires, as per row
            votes = sum(c > self.threshold[r] for r, c in zip(self.budgeted, cos))
            if quorum_reached(votes, len(self.budgeted), self.quorum_per_mille):
                self.fired = True
                for r in self.budgeted:
                    self.remaining[r] = self.max_skips[r]
        skip = [r for r, left in enumerate(self.remaining) if left > 0]
        for r in skip:
            self.remaining[r] -= 1
            self.row_skipped[r] += 1
        self.layer_skipped[layer] = len(skip)
        if len(skip) == h.shape[0]:
            return h  # no row needs this FFN: its weights are not read
        out = ffn_except(h, ffn, skip, self.row_state)
        if layer < self.last_hot:
            self._record_cos(h, out)
        return out

    def _record_cos(self, h, out):
        if self.fired:
            return  # the batch has fired (or cannot): no cosine is needed any more
        idx = torch.tensor(self.budgeted, device=h.device)
        self.prev_cos = F.cosine_similarity(h.index_select(0, idx).float(), out.index_select(0, idx).float(),
                                            dim=-1).tolist()

    def own_counts(self, num_rows: int) -> tuple[list[int], list[int]]:
        return list(self.row_skipped), list(self.layer_skipped)


class BatchAlignedPolicy(SkipPolicy):
    name = "batch_aligned"

    def __init__(self, config, num_layers: int, quorum: float = DEFAULT_QUORUM):
        super().__init__(config, num_layers)
        if not 0.0 < quorum <= 1.0:
            raise ValueError(f"batch-aligned quorum must be in (0, 1], got {quorum}")
        self.quorum = quorum

    def make_gate(self, rows: list[RowSkip], device):
        if all(r.max_skips == 0 for r in rows):
            return DenseGate(self.num_layers)
        return BatchAlignedGate(rows, self.num_layers, self.config.cold_start, self.config.cold_end, self.quorum)
