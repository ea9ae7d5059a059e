"""Linear layers on quantized weights, and the one constructor the models call for any weight.

`make_linear(parts, bias)` (the CPU backend's `linear`) takes the row blocks of one fused
projection (q|k|v, gate|up, or a single matrix), dense tensors or `QuantWeight`s:
- all dense: one `Linear` (engine/backends/cpu/linear.py) on the concatenated matrix;
- all quantized in one layout: one `QuantLinear` on the stacked rows (one kernel call);
- otherwise (Q4_K_M files mix 4-bit q/k with 8-bit v): a `ConcatLinear` of the parts.
`QuantLinear` holds its weight in the kernel's tiles (engine/quant/tiled.py) and runs the native
quantized kernel for the best instruction set this CPU has (engine/native/quant_ops.py); without
the native library the weights are dequantized to dense.
"""
from __future__ import annotations

import torch

from engine.backends.cpu.linear import Linear
from engine.native import quant_ops
from engine.quant import QuantWeight
from engine.quant.tiled import TiledWeight


class QuantLinear:
    def __init__(self, weight: QuantWeight | TiledWeight, bias: torch.Tensor | None = None, isa: str | None = None):
        self.weight = weight if isinstance(weight, TiledWeight) else TiledWeight.from_weight(weight)
        self.out_features, self.in_features = weight.shape
        self.format = weight.source
        isa = isa or quant_ops.best_isa()
        self.backend = f"quant-{isa}"
        self.kernel = quant_ops.kernel(isa)
        self.bias = None if bias is None else bias.float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return quant_ops.linear(x.float(), self.weight, self.bias, self.kernel).to(x.dtype)

    def numel(self) -> int:
        return self.out_features * self.in_features

    def nbytes(self) -> int:
        return self.weight.nbytes

    @property
    def embedding(self) -> TiledWeight:
        """The matrix for a tied embedding's lookups (`weight[ids]`), so it is held once."""
        return self.weight


class ConcatLinear:
    """Row blocks with different layouts: each its own layer, outputs concatenated."""

    def __init__(self, parts: list):
        self.parts = parts
        self.out_features = sum(p.out_features for p in parts)
        self.in_features = parts[0].in_features
        self.backend = "+".join(dict.fromkeys(p.backend for p in parts))
        self.format = "+".join(dict.fromkeys(p.format for p in parts))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def numel(self) -> int:
        return sum(p.numel() for p in self.parts)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)


def make_linear(parts: list, bias: torch.Tensor | None = None):
    """One layer for the row blocks `parts` (dense tensors on the CPU in the model's dtype, or
    QuantWeights) and an optional bias."""
    if any(isinstance(p, QuantWeight) for p in parts) and quant_ops.best_isa() is None:
        parts = [p.dequantize() if isinstance(p, QuantWeight) else p for p in parts]
    if not any(isinstance(p, QuantWeight) for p in parts):
        return Linear(parts[0] if len(parts) == 1 else torch.cat(parts), bias)  # one part: no copy (tied lm_head)
    if all(isinstance(p, QuantWeight) for p in parts) and len({p.layout for p in parts}) == 1:
        return QuantLinear(TiledWeight.from_weight(parts), bias)  # (each part tiled into its place)
    biases = [None] * len(parts) if bias is None else bias.split([p.shape[0] for p in parts])
    return ConcatLinear([make_linear([p], b) for p, b in zip(parts, biases)])
