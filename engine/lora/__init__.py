"""LoRA adapters served beside the base model: adapter.py and gguf_adapter.py read them, registry.py
serves them, linear.py applies them; errors.py (torch-free) names what cannot be served. Nothing is
imported here, so that server/ may import errors.py without torch."""
