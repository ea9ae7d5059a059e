"""Quantized weights: the layout the CPU kernels read (`weight.py`) and its construction from a
GGUF file's blocks (`formats.py`)."""
from engine.quant.weight import QuantWeight


def to_device(weight, device, dtype):
    """A dense tensor moved and cast; a QuantWeight as it is (the CPU kernels read it in place)."""
    return weight if isinstance(weight, QuantWeight) else weight.to(device=device, dtype=dtype)


__all__ = ["QuantWeight", "to_device"]
