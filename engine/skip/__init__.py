"""FFN-skip policies. The model calls the step's gate once per layer; a policy builds that gate.

- `none`: every FFN runs (exact dense).
- `ffn_skipllm`: FFN-SkipLLM (Jaiswal et al., 2024), per row and per token, decided on the device.
- `batch_aligned`: the same trigger, but the budgeted rows of a step skip the same layers once a
  quorum of them fires (at batch > 1 a layer's weights are read if any row runs it).
"""
from __future__ import annotations

import logging

from engine.config import SkipConfig
from engine.skip.base import DenseGate, RowSkip, SkipPolicy, TokenSkipPlan
from engine.skip.batch_aligned import BatchAlignedPolicy
from engine.skip.ffn_skipllm import FFNSkipLLMPolicy


class NoSkipPolicy(SkipPolicy):
    name = "none"
    may_skip = False

    def make_gate(self, rows, device):
        return DenseGate(self.num_layers)


POLICIES = {"none": NoSkipPolicy, "ffn_skipllm": FFNSkipLLMPolicy, "batch_aligned": BatchAlignedPolicy}


def build_policy(config: SkipConfig, num_layers: int) -> SkipPolicy:
    if config.policy not in POLICIES:
        raise ValueError(f"unknown skip policy {config.policy!r} (known: {sorted(POLICIES)})")
    policy = POLICIES[config.policy](config, num_layers)
    if config.policy != "none" and not policy.max_skippable:  # (said at start, not found in every usage)
        logging.getLogger("skipserve.skip").warning(
            "skip cold_start %d + cold_end %d cover all %d of the model's layers: no FFN is ever skipped, "
            "whatever a request's budget", config.cold_start, config.cold_end, num_layers)
    return policy


__all__ = ["build_policy", "SkipPolicy", "RowSkip", "TokenSkipPlan", "DenseGate", "POLICIES"]
