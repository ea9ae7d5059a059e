"""What the Triton kernel wrappers of this package share."""
from __future__ import annotations

import torch
import triton


def interpreted(tensor: torch.Tensor) -> bool:
    """Whether kernels on `tensor` run under Triton's interpreter (TRITON_INTERPRET=1): CPU
    tensors only do. Wrappers that configure a kernel differently there ask this, so that
    scripts/triton_compile_check.py can compile their GPU configuration on CPU tensors."""
    return tensor.device.type == "cpu"


def upcast_dots(tensor: torch.Tensor) -> bool:
    """Whether `tl.dot` operands must be cast to fp32 first: under the interpreter, whose numpy
    `dot` multiplies bf16 as raw uint16 bits (triton 3.9); on a GPU bf16 operands go to the
    tensor cores as they are and accumulate in fp32."""
    return interpreted(tensor)


def dot_precision(tensor: torch.Tensor) -> str:
    """`tl.dot`'s input precision for operands of `tensor`'s dtype: fp32 operands multiply in full
    fp32 ("ieee"); Triton's default for them on a GPU is TF32, whose 10-bit mantissa puts fp32
    results ~1e-3 off. bf16/fp16 operands go to the tensor cores whatever this says."""
    return "ieee" if tensor.dtype == torch.float32 else "tf32"


def dot_size(n: int) -> int:
    """A `tl.dot` dimension covering n: a power of two, at least 16 (the tensor-core minimum)."""
    return max(16, triton.next_power_of_2(n))
