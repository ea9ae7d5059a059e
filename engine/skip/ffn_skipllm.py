"""FFN-SkipLLM, batched: every row decides on its own, on the device, per layer.

At each non-cold layer j a row looks at cos(h, out) of layer j-1 (the residual before and after
that FFN). The first time it exceeds the row's threshold, the row skips its next `max_skips`
FFNs contiguously (cold end layers always run). Decisions stay tensors: no `.item()` per layer.
Two executions of the same rule:
- `HostFFNSkipLLMGate` (CPU): a host sync costs nothing there, so decisions are plain Python over
  the few cosines still needed (none once every row has fired); only the rows that run an FFN are
  gathered and computed, and a layer no row needs is not run at all. The CPU's native decode
  layers run the same rule inside one call instead (engine/backends/cpu/fused_decode.py).
- `FFNSkipLLMGate` (CUDA, per-op path): decisions stay tensors on the device, no host sync per
  layer; every row is computed and skipped rows keep `h` (`masked`), which keeps the semantics, not
  the time. The CUDA decode step runs the rule itself instead, in Triton kernels whose FFNs
  read no weight for a layer no row runs, and whose mixtures route a skipping row to no expert
  (engine/backends/cuda/device_gate.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.skip.base import NO_COSINE, DenseGate, RowSkip, RuleGate, SkipPolicy, ffn_except


class FFNSkipLLMGate(RuleGate):
    def __init__(self, rows: list[RowSkip], num_layers: int, cold_start: int, cold_end: int, device):
        super().__init__(rows)
        self.num_layers, self.device = num_layers, device
        self.first_hot, self.last_hot = cold_start, num_layers - cold_end - 1
        self.max_skips = None  # the device state, made at the first layer: a backend that runs the rule
        self.prev_cos = None  # itself (engine/backends/cuda/decode_step.py) never needs it

    def _start(self) -> None:
        rows, device = self.rows, self.device
        self.max_skips = torch.tensor([r.max_skips for r in rows], device=device)
        self.threshold = torch.tensor([r.threshold for r in rows], device=device)
        self.fired = torch.zeros(len(rows), dtype=torch.bool, device=device)
        self.remaining = torch.zeros(len(rows), dtype=torch.long, device=device)
        self.skipped = torch.zeros(self.num_layers, len(rows), dtype=torch.bool, device=device)

    def __call__(self, layer, h, ffn):
        if self.max_skips is None:
            self._start()
        if layer < self.first_hot or layer > self.last_hot:
            out = h + ffn(h)
            if layer == self.first_hot - 1:
                self.prev_cos = F.cosine_similarity(h.float(), out.float(), dim=-1)
            return out
        if self.prev_cos is None:  # no cold start layers: nothing to compare with yet, so nothing fires
            self.prev_cos = torch.full_like(self.threshold, NO_COSINE)
        fire = ~self.fired & (self.max_skips > 0) & (self.prev_cos > self.threshold)
        self.remaining = torch.where(fire, self.max_skips, self.remaining)
        self.fired |= fire
        skip = self.remaining > 0
        self.remaining -= skip.long()
        self.skipped[layer] = skip
        # every row is computed and skipped rows keep h: no host sync to learn which rows run
        out = torch.where(skip[:, None], h, h + ffn(h))
        if layer < self.last_hot:
            self.prev_cos = F.cosine_similarity(h.float(), out.float(), dim=-1)
        return out

    def own_counts(self, num_rows: int) -> tuple[list[int], list[int]]:
        return self.skipped.sum(0).tolist(), self.skipped.sum(1).tolist()


class HostFFNSkipLLMGate(RuleGate):
    def __init__(self, rows: list[RowSkip], num_layers: int, cold_start: int, cold_end: int):
        super().__init__(rows)
        self.num_layers = num_layers
        self.first_hot, self.last_hot = cold_start, num_layers - cold_end - 1
        self.max_skips = [r.max_skips for r in rows]
        self.threshold = [r.threshold for r in rows]
        self.armed = [i for i, r in enumerate(rows) if r.max_skips > 0]  # may still fire
        self.remaining = [0] * len(rows)
        self.prev_cos: dict[int, float] = {}  # armed row -> cos of the previous layer
        self.row_skipped = [0] * len(rows)
        self.layer_skipped = [0] * num_layers

    def __call__(self, layer, h, ffn):
        if layer < self.first_hot or layer > self.last_hot:
            out = h + ffn(h)
            if layer == self.first_hot - 1:
                self._record_cos(h, out)
            return out
        for row in [r for r in self.armed if self.prev_cos.get(r, NO_COSINE) > self.threshold[r]]:
            self.remaining[row] = self.max_skips[row]
            self.armed.remove(row)
        skip = [r for r, left in enumerate(self.remaining) if left > 0]
        for row in skip:
            self.remaining[row] -= 1
            self.row_skipped[row] += 1
        self.layer_skipped[layer] = len(skip)
        if len(skip) == h.shape[0]:
            return h  # no row needs this FFN: its weights are not even read
        out = ffn_except(h, ffn, skip, self.row_state)
        if layer < self.last_hot:
            self._record_cos(h, out)
        return out

    def _record_cos(self, h, out):
        if not self.armed:
            return  # every row has fired (or may not skip): no cosine is needed any more
        # in fp32 as the other gates: in bf16 a cosine near 1 moves in steps of 2^-8, so a threshold
        # of 0.985 would act as 0.988
        if len(self.armed) == h.shape[0]:
            cos = F.cosine_similarity(h.float(), out.float(), dim=-1).tolist()
        else:
            idx = torch.tensor(self.armed, device=h.device)
            cos = F.cosine_similarity(h.index_select(0, idx).float(), out.index_select(0, idx).float(),
                                      dim=-1).tolist()
        self.prev_cos = dict(zip(self.armed, cos))

    def own_counts(self, num_rows: int) -> tuple[list[int], list[int]]:
        return list(self.row_skipped), list(self.layer_skipped)


class FFNSkipLLMPolicy(SkipPolicy):
    name = "ffn_skipllm"

    def make_gate(self, rows: list[RowSkip], device):
        if all(r.max_skips == 0 for r in rows):
            return DenseGate(self.num_layers)  # warm-up and dense rows cost nothing extra
        device = torch.device(device)
        cold_start, cold_end = self.config.cold_start, self.config.cold_end
        if device.type == "cpu":
            return HostFFNSkipLLMGate(rows, self.num_layers, cold_start, cold_end)
        return FFNSkipLLMGate(rows, self.num_layers, cold_start, cold_end, device)
