"""Torch-facing wrapper of the quantized GEMM (engine/native/quant_linear.cpp).

The library holds one build of the kernel per instruction set (`quant_linear_avx2`,
`quant_linear_avx512`, see engine/native/build.py); `isas()` lists those this CPU runs, best
first, so an AVX-512 host can also run (and test) the AVX2 build.
"""
from __future__ import annotations

import torch

from engine.native.build import emulated_isa, kernels
from engine.quant.tiled import TiledWeight

ISA_LEVELS = {"avx512": 2, "avx2": 1}  # quant_cpu_isa() level each build needs, best first


def isas() -> list[str]:
    """The kernel builds this CPU runs, best first (empty without the native library)."""
    lib = kernels()
    if lib is None:
        return []
    level = lib.quant_cpu_isa() if emulated_isa() is None else ISA_LEVELS["avx2"]  # an emulated AVX2 host
    return [isa for isa, need in ISA_LEVELS.items() if level >= need and hasattr(lib, f"quant_linear_{isa}")]


def best_isa() -> str | None:
    found = isas()
    return found[0] if found else None


def kernel(isa: str):
    """The kernel built for `isa`, bound once: a layer built on it keeps it."""
    return getattr(kernels(), f"quant_linear_{isa}")


def linear(x: torch.Tensor, weight: TiledWeight, bias: torch.Tensor | None, kernel) -> torch.Tensor:
    """x: [rows, in] fp32; bias: [out] fp32 or None; kernel: from `kernel()` -> [rows, out] fp32."""
    x = x.contiguous()
    rows, inp = x.shape
    out = weight.shape[0]
    assert inp == weight.shape[1], (inp, weight.shape)
    y = torch.empty(rows, out, dtype=torch.float32)
    offset, table = weight.offset, weight.table
    done = kernel(x.data_ptr(), weight.q.data_ptr(), weight.scale.data_ptr(),
                  None if offset is None else offset.data_ptr(), None if table is None else table.data_ptr(),
                  None if bias is None else bias.data_ptr(),
                  y.data_ptr(), rows, inp, out, weight.bits, weight.group, weight.scale_bits, torch.get_num_threads())
    if not done:
        raise ValueError(f"no quantized kernel for {weight.bits}-bit groups of {weight.group} "
                         f"with {weight.scale_bits}-bit scales")
    return y
