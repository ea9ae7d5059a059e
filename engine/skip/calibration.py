"""Calibration: how much does each layer's FFN change the residual, per token?

A recording gate runs every FFN (dense) and keeps cos(h, h + FFN(h)) per layer and row; the
statistics suggest per-model skip settings: cold layers are those whose FFN changes the
residual most, and the threshold is the quantile of the middle layers' cosine at which the
trigger fires for a chosen share of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.skip.base import DenseGate


class RecordingGate(DenseGate):
    acts_per_layer = True

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.cosines: list[torch.Tensor] = [None] * num_layers  # [rows] per layer

    def __call__(self, layer, h, ffn):
        out = h + ffn(h)
        self.cosines[layer] = F.cosine_similarity(h.float(), out.float(), dim=-1)
        return out

    def matrix(self) -> torch.Tensor:
        return torch.stack(self.cosines)  # [layers, rows]


@dataclass
class CalibrationResult:
    cosines: list[list[float]]  # per layer, one value per token
    cold_start: int
    cold_end: int
    threshold: float
    trigger_rate: float  # share of tokens whose trigger fires with these settings

    def summary(self) -> dict:
        t = torch.tensor(self.cosines)
        q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
        quant = torch.quantile(t, q, dim=1).T.tolist()
        return {
            "suggested": {"cold_start": self.cold_start, "cold_end": self.cold_end,
                          "threshold": round(self.threshold, 4)},
            "trigger_rate_at_suggested": round(self.trigger_rate, 4),
            "tokens": t.shape[1],
            "layers": [{"layer": i, "mean": round(float(t[i].mean()), 4),
                        "quantiles": dict(zip(["p05", "p25", "p50", "p75", "p95"], [round(v, 4) for v in quant[i]])),
                        "share_above_threshold": round(float((t[i] > self.threshold).float().mean()), 4)}
                       for i in range(t.shape[0])],
        }


def suggest(cosines: torch.Tensor, target_trigger_rate: float = 0.6, cold_floor: float = 0.9) -> CalibrationResult:
    """cosines: [layers, tokens]. Cold layers: contiguous runs at either end whose median cosine is
    below `cold_floor` (at least one each side). Threshold: fires for `target_trigger_rate` of tokens
    at some middle layer, i.e. the (1 - rate) quantile of each token's first chance."""
    layers = cosines.shape[0]
    median = cosines.median(dim=1).values
    cold_start = 1
    while cold_start < layers // 3 and median[cold_start] < cold_floor:
        cold_start += 1
    cold_end = 1
    while cold_end < layers // 3 and median[layers - 1 - cold_end] < cold_floor:
        cold_end += 1
    # The trigger looks at layer j-1 for j in the hot range: the max over those layers tells whether
    # (and the first crossing when) a token would fire at a given threshold.
    window = cosines[cold_start - 1: layers - cold_end - 1]
    best = window.max(dim=0).values
    threshold = float(torch.quantile(best, 1.0 - target_trigger_rate))
    rate = float((best > threshold).float().mean())
    return CalibrationResult(cosines.tolist(), cold_start, cold_end, threshold, rate)
