"""A dense linear layer on the CPU, its weight stored the way the chosen kernel wants it.

On CPU, in order of preference:
- `native`: skipserve's own C++ kernels (`engine/native/linear*.cpp`) on a 16-output blocked
  layout, when they are built and vectorized for this CPU (AVX-512; AVX512-BF16 for bf16
  weights). fp32 activations in and out, no casts; bf16 weights round the input to bf16 and sum in
  fp32, as oneDNN does.
- `onednn`: the weight reordered once into oneDNN's blocked layout and its matmul primitive
  called directly (the pre-packing torch's inductor does when it freezes a model).
- `plain`: `F.linear` (a torch without oneDNN).
`bench/gemm.py` measures the three side by side. Weights may be narrower than the activations
(bf16 weights, fp32 activations on CPU): the oneDNN and plain paths cast the input and the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.native import ops as native_ops

PACKABLE = (torch.float32, torch.bfloat16)


def pick_backend(weight: torch.Tensor) -> str:
    if native_ops.linear_supported(weight):
        return "native"
    if weight.device.type == "cpu" and weight.dtype in PACKABLE and torch.backends.mkldnn.is_available():
        return "onednn"
    return "plain"


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str | None = None):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.backend = backend or pick_backend(weight)
        if self.backend == "native":
            self.bias = None if bias is None else bias.float().contiguous()
            self.weight = native_ops.block_weight(weight)
            self.kernel = native_ops.linear_kernel(weight.dtype)
        elif self.backend == "onednn":
            self.bias = None if bias is None else bias.to(weight.dtype)
            # the batch-size hint only picks the blocking; measured equal speed from 1 to 16 rows
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        else:
            self.bias = None if bias is None else bias.to(weight.dtype)
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "native":
            return native_ops.linear(x.float(), self.weight, self.bias, self.kernel).to(x.dtype)
        if x.dtype != self.dtype:
            return self._matmul(x.to(self.dtype)).to(x.dtype)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def numel(self) -> int:
        return self.out_features * self.in_features
