"""A request's FFN-skip settings: its `ffn_skip` fields over the server's defaults, validated."""
from __future__ import annotations

from engine.config import SkipConfig
from engine.sampling_params import InvalidParamError, SkipParams
from engine.skip.base import TokenSkipPlan


def resolve_skip(cfg: SkipConfig, skip: SkipParams | None) -> TokenSkipPlan:
    skip = skip or SkipParams()
    budget = cfg.default_budget if skip.budget is None else skip.budget
    if not 0.0 <= budget <= cfg.max_budget:
        raise InvalidParamError(f"ffn_skip.budget must be in [0, {cfg.max_budget}]", "ffn_skip.budget")
    threshold = cfg.threshold if skip.threshold is None else skip.threshold
    if not -1.0 <= threshold <= 1.0:
        raise InvalidParamError("ffn_skip.threshold must be in [-1, 1]", "ffn_skip.threshold")
    warmup = cfg.warmup_tokens if skip.warmup_tokens is None else skip.warmup_tokens
    if warmup < 0:
        raise InvalidParamError("ffn_skip.warmup_tokens must be >= 0", "ffn_skip.warmup_tokens")
    if cfg.policy == "none":
        budget = 0.0
    return TokenSkipPlan(budget, threshold, warmup, cfg.interleave)
