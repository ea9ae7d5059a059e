"""FFN-SkipLLM, batched: every row decides on its own, on the device, per layer.

At each non-cold layer j a row looks at cos(h, out) of layer j-1 (the residual before and after
that FFN). The first time it exceeds the row's threshold, the row skips its next `max_skips`
FFNs contiguously (cold end layers always run). Decisions stay tensors: no `.item()` per layer.
In `gather` mode (CPU) only the rows that run an FFN are gathered and computed, and a layer no
row needs is not run at all; in `masked` mode (CUDA, no host sync) every row is computed and
skipped rows keep `h`, which preserves the semantics but not the time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.skip.base import DenseGate, RowSkip, SkipPolicy


class FFNSkipLLMGate:
    def __init__(self, rows: list[RowSkip], num_layers: int, cold_start: int, cold_end: int, device, gather: bool):
        self.num_layers, self.gather = num_layers, gather
        self.first_hot, self.last_hot = cold_start, num_layers - cold_end - 1
        self.max_skips = torch.tensor([r.max_skips for r in rows], device=device)
        self.threshold = torch.tensor([r.threshold for r in rows], device=device)
        self.fired = torch.zeros(len(rows), dtype=torch.bool, device=device)
        self.remaining = torch.zeros(len(rows), dtype=torch.long, device=device)
        self.skipped = torch.zeros(num_layers, len(rows), dtype=torch.bool, device=device)
        self.prev_cos = None

    def __call__(self, layer, h, ffn):
        if layer < self.first_hot or layer > self.last_hot:
            out = h + ffn(h)
            if layer == self.first_hot - 1:
                self.prev_cos = F.cosine_similarity(h.float(), out.float(), dim=-1)
            return out
        if self.prev_cos is None:  # no cold start layers: nothing to compare with yet
            self.prev_cos = torch.zeros_like(self.threshold)
        fire = ~self.fired & (self.max_skips > 0) & (self.prev_cos > self.threshold)
        self.remaining = torch.where(fire, self.max_skips, self.remaining)
        self.fired |= fire
        skip = self.remaining > 0
        self.remaining -= skip.long()
        self.skipped[layer] = skip
        out = self._run_rows(h, ffn, skip)
        if layer < self.last_hot:
            self.prev_cos = F.cosine_similarity(h.float(), out.float(), dim=-1)
        return out

    def _run_rows(self, h, ffn, skip):
        if not self.gather:
            return torch.where(skip[:, None], h, h + ffn(h))
        run = (~skip).nonzero().squeeze(1)  # free on CPU; a host sync on CUDA
        if run.numel() == h.shape[0]:
            return h + ffn(h)
        if run.numel() == 0:
            return h  # no row needs this FFN: its weights are not even read
        rows = h.index_select(0, run)
        return h.index_copy(0, run, rows + ffn(rows))

    def skip_counts(self, num_rows: int) -> tuple[list[int], list[int]]:
        return self.skipped.sum(0).tolist(), self.skipped.sum(1).tolist()


class FFNSkipLLMPolicy(SkipPolicy):
    name = "ffn_skipllm"

    def make_gate(self, rows: list[RowSkip], device):
        if all(r.max_skips == 0 for r in rows):
            return DenseGate(self.num_layers)  # warm-up and dense rows cost nothing extra
        device = torch.device(device)
        return FFNSkipLLMGate(rows, self.num_layers, self.config.cold_start, self.config.cold_end,
                              device, gather=device.type == "cpu")
