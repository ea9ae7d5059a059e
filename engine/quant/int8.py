"""`--quantize int8`: dense matrices (HF safetensors, or a GGUF dequantized by --dtype float32)
rounded to int8 per group of 32 inputs, weight-only, for the CPU's quantized kernel.

Each group gets d = max|w| / 127 and q = round(w / d) in -127..127 (w ~ d * q, error <= d / 2 per
weight); the projections, the embedding and an untied lm_head are quantized, norms and biases
stay dense. 8-bit groups of 32 are one of the layouts the kernel reads (engine/quant/weight.py).
"""
from __future__ import annotations

import torch

from engine.quant.weight import QuantWeight

GROUP = 32


def quantize_int8(w: torch.Tensor) -> QuantWeight:
    """w: [out, in] with in a multiple of 32 -> QuantWeight (8 bits, groups of 32, no offset)."""
    out, inp = w.shape
    groups = w.float().reshape(out, inp // GROUP, GROUP)
    d = groups.abs().amax(-1) / 127.0
    q = torch.round(groups / torch.where(d > 0, d, 1.0).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return QuantWeight(q=q.reshape(out, inp).view(torch.uint8), scale=d.contiguous(), offset=None, bits=8,
                       group=GROUP, source="int8")


def quantizable(name: str, t: torch.Tensor) -> bool:
    matrix = name.endswith("_proj.weight") or name in ("model.embed_tokens.weight", "lm_head.weight")
    return matrix and t.dim() == 2 and t.shape[1] % GROUP == 0


def quantize_state(state: dict) -> dict:
    """The state dict with its matrices as int8 QuantWeights (the rest as it was)."""
    return {name: quantize_int8(t) if quantizable(name, t) else t for name, t in state.items()}
