"""Quantized weights: the layout the CPU kernels read (`weight.py`) and its construction from a
GGUF file's blocks (`formats.py`)."""
from engine.quant.weight import QuantWeight

__all__ = ["QuantWeight"]
