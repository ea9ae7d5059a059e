"""A dense linear layer whose weight is stored the way the device's GEMM wants it.

On CPU the weight is reordered once, at load, into oneDNN's blocked layout for its matmul
primitive (the same pre-packing torch's inductor does when it freezes a model), and every call
runs that primitive directly. `bench/gemm.py` on the 2-core AMD EPYC CI machines, 30 SmolLM2
layers (qkv, o, gate|up, down) with weights cold in DRAM: fp32 24 ms a step at 1 row and 42 ms
at 16 rows, vs 36 and 112 ms for `F.linear` (MKL) on the plain layout; bf16 14 vs 25 ms and 15
vs 39 ms. Elsewhere (CUDA, or a torch without oneDNN) it is `F.linear`.

Weights may be held in a narrower dtype than the activations (bf16 weights with fp32
activations on CPU): the input is cast to the weight dtype and the output back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PACKABLE = (torch.float32, torch.bfloat16)


def _can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in PACKABLE and torch.backends.mkldnn.is_available()


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = None if bias is None else bias.to(weight.dtype)
        self.packed = _can_pack(weight)
        # the batch-size hint only picks the blocking; measured equal speed from 1 to 16 rows
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            return self._matmul(x.to(self.dtype)).to(x.dtype)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def numel(self) -> int:
        return self.out_features * self.in_features
