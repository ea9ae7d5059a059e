"""Model implementations. Each takes a HF state dict and runs over the slot KV cache."""
from __future__ import annotations

from engine.config import ModelConfig

LLAMA_FAMILY = {"llama", "mistral", "qwen2", "smollm2"}


def build_model(config: ModelConfig, state: dict, device, dtype):
    if config.model_type in LLAMA_FAMILY:
        from engine.models.llama import LlamaModel

        return LlamaModel(config, state, device, dtype)
    raise ValueError(f"unsupported architecture {config.model_type!r} (supported: {sorted(LLAMA_FAMILY)})")
