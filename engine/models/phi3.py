"""Phi-3 (Phi-3-mini, Phi-3.5-mini, Phi-3-medium, Phi-4-mini): the Llama layout with q|k|v and
gate|up stored fused (`qkv_proj`, `gate_up_proj`: the row blocks the Llama layer fuses anyway), a
sliding window where the config sets one, and longrope scaling (engine/models/rope.py) in the
long-context versions. Phi-4-mini rotates the leading 3/4 of each head (`partial_rotary_factor`:
the model's rotary tables are that wide, and the backends' rotary turns that many dimensions)."""
from __future__ import annotations

from engine.config import ModelConfig
from engine.models.llama import LlamaLayer, LlamaModel


class Phi3Layer(LlamaLayer):
    qkv_names = ("self_attn.qkv_proj",)
    gate_up_names = ("mlp.gate_up_proj",)

    def __init__(self, cfg: ModelConfig, weights: dict, prefix: str, device, dtype, act_dtype, index: int, ops):
        super().__init__(cfg, weights, prefix, device, dtype, act_dtype, index, ops)
        if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
            self.window = cfg.sliding_window


class Phi3Model(LlamaModel):
    layer_class = Phi3Layer
