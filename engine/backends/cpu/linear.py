"""A dense linear layer on the CPU, its weight stored the way the chosen kernel wants it.

On CPU, in order of preference:
- `native`: skipserve's own C++ kernels (`engine/native/linear*.cpp`) on a 16-output blocked
  layout, when they are built and vectorized for this CPU (AVX-512 or AVX2 + FMA; bf16 with
  AVX512-BF16's dot products, else widened in AVX-512 or AVX2 registers). fp32 activations in and out, no casts;
  bf16 weights round the input to bf16 and sum in fp32, as oneDNN does.
- `onednn`: the weight reordered once into oneDNN's blocked layout and its matmul primitive
  called directly (the pre-packing torch's inductor does when it freezes a model). oneDNN's bf16
  path needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT: without them bf16 weights go `plain`.
- `plain`: `F.linear` (a torch without oneDNN, or bf16 where oneDNN has no path).
`bench/gemm.py` measures the three side by side. Weights may be narrower than the activations
(bf16 weights, fp32 activations on CPU): the oneDNN and plain paths cast the input and the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.native import ops as native_ops
from engine.native.build import emulated_isa


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's pre-packed matmul runs `dtype` weights on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype != torch.bfloat16 or emulated_isa() is not None:  # an emulated AVX2 host has no bf16 path
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported is not None and supported())


def pick_backend(weight: torch.Tensor) -> str:
    if native_ops.linear_supported(weight):
        return "native"
    if weight.device.type == "cpu" and onednn_packs(weight.dtype):
        return "onednn"
    return "plain"


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str | None = None):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.backend = backend or pick_backend(weight)
        if self.backend == "native":  # outputs padded to whole blocks
            self.bias = native_ops.block_bias(bias, self.out_features)
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
            return native_ops.linear(x.float(), self.weight, self.bias, self.kernel, self.out_features).to(x.dtype)
        if x.dtype != self.dtype:
            return self._matmul(x.to(self.dtype)).to(x.dtype)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def numel(self) -> int:
        return self.out_features * self.in_features

    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    @property
    def format(self) -> str:
        return str(self.dtype).removeprefix("torch.")
