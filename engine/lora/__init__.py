"""LoRA adapters served beside the base model (engine/lora/registry.py)."""
from engine.lora.adapter import AdapterError, LoRAAdapter, read_adapter
from engine.lora.registry import LoRARegistry

__all__ = ["AdapterError", "LoRAAdapter", "LoRARegistry", "read_adapter"]
