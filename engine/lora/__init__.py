"""LoRA adapters served beside the base model (engine/lora/registry.py)."""
from engine.lora.adapter import AdapterError, LoRAAdapter, read_adapter
from engine.lora.registry import DEFAULT_ADAPTER, LoRARegistry

__all__ = ["AdapterError", "DEFAULT_ADAPTER", "LoRAAdapter", "LoRARegistry", "read_adapter"]
