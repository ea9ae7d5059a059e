"""The FFN-skip gate of a CUDA decode step: decisions on the device, per layer, with no host sync,
in buffers allocated once (a CUDA graph replays fixed addresses).

The decode step (decode_step.py) owns the inputs `max_skips` (int32) and `thresholds` (fp32), one
entry per row of the largest batch, in its static buffers (graphs.py), and fills them before each
step from the step's rule gate (rows past the batch: max_skips -1, never skip and never run a hot FFN).
Per step: `reset()` (captured inside a graph), then the model calls `gate(layer, h, ffn)` in every
layer with a masked FFN, `ffn(h, run) -> out` (out = h + FFN(h) for rows whose run flag is set,
h for the others: engine/backends/cuda/masked_ffn.py), and after the step `skip_counts(n)` reads
the exact skips once. quorum=None is FFN-SkipLLM's per-row rule (engine/skip/ffn_skipllm.py), a
quorum in (0, 1] the batch-aligned rule (engine/skip/batch_aligned.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from engine.backends.cuda.skip_decision import decide_aligned, decide_rows, row_cosine

MaskedFFNCall = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class DeviceSkipGate:
    acts_per_layer = True

    def __init__(self, max_skips: torch.Tensor, thresholds: torch.Tensor, num_layers: int, cold_start: int,
                 cold_end: int, quorum: float | None = None):
        rows, device = max_skips.shape[0], max_skips.device
        assert max_skips.dtype == torch.int32 and thresholds.dtype == torch.float32
        self.max_skips, self.thresholds = max_skips, thresholds
        self.num_layers = num_layers
        self.first_hot, self.last_hot = cold_start, num_layers - cold_end - 1
        self.quorum_per_mille = None if quorum is None else round(quorum * 1000)
        self.fired = torch.zeros(rows, dtype=torch.int32, device=device)
        self.remaining = torch.zeros(rows, dtype=torch.int32, device=device)
        self.skipped = torch.zeros(num_layers, rows, dtype=torch.int32, device=device)
        self.run = torch.zeros(rows, dtype=torch.int32, device=device)
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (h, out) of the previous layer

    def reset(self) -> None:
        """Start of a step: no row has fired or skipped anything."""
        self.fired.zero_()
        self.remaining.zero_()
        self.skipped.zero_()
        self._prev = None

    def __call__(self, layer: int, h: torch.Tensor, ffn: MaskedFFNCall) -> torch.Tensor:
        if layer < self.first_hot or layer > self.last_hot:
            out = ffn(h, None)
            if layer == self.first_hot - 1:
                self._prev = (h, out)
            return out
        rows = h.shape[0]
        state = (self.max_skips[:rows], self.thresholds[:rows], self.fired[:rows], self.remaining[:rows],
                 self.skipped[layer, :rows], self.run[:rows])
        if self.quorum_per_mille is None:
            decide_rows(self._prev, *state)
        else:
            decide_aligned(None if self._prev is None else row_cosine(*self._prev), *state, self.quorum_per_mille)
        out = ffn(h, self.run[:rows])
        self._prev = (h, out) if layer < self.last_hot else None
        return out

    def skip_counts(self, num_rows: int) -> tuple[list[int], list[int]]:
        """-> (FFNs skipped per row, rows skipped per layer) over the first `num_rows` rows: one
        device-to-host copy, after the step."""
        skipped = self.skipped[:, :num_rows].cpu()
        return skipped.sum(0).tolist(), skipped.sum(1).tolist()
