"""Gemma 2: Gemma 3's layer (four norms of 1 + w, GELU-tanh, sliding-window layers, embeddings
scaled by sqrt(hidden_size)) less the per-head q/k norms and the local rope base, plus soft caps:

- attention scores s become attn_logit_softcapping * tanh(s / attn_logit_softcapping) before the
  mask and the softmax (50 in Gemma 2's configs);
- the logits the same with final_logit_softcapping (30).

Every other layer attends over a sliding window (4,096 tokens), all with one rope base.
"""
from __future__ import annotations

import torch

from engine.models.gemma3 import Gemma3Layer, Gemma3Model


class Gemma2Layer(Gemma3Layer):
    kind = "gemma2"
    head_norms = False
    local_rope = False

    def __init__(self, cfg, weights, prefix, device, dtype, act_dtype, index, ops):
        super().__init__(cfg, weights, prefix, device, dtype, act_dtype, index, ops)
        self.softcap = cfg.attn_logit_softcapping


class Gemma2Model(Gemma3Model):
    layer_class = Gemma2Layer

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        cap = self.cfg.final_logit_softcapping
        logits = super().logits(hidden)
        return logits.div_(cap).tanh_().mul_(cap) if cap else logits
