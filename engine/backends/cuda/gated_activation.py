"""act(gate) * up over a fused [rows, 2 * inter] gate|up projection: SiLU (Llama family) or
GELU-tanh (Gemma). Math in fp32, output in the input's dtype. `clamped_swiglu` is gpt-oss's
experts' form, fused into the routed experts' loads (expert_linear.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))  # never overflows, for any z
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def gated(gate, up, GELU_TANH: tl.constexpr):
    """act(gate) * up on fp32 tiles (also fused into the masked linear's loads)."""
    if GELU_TANH:  # 0.5 x (1 + tanh(y)) = x * sigmoid(2y), y = sqrt(2/pi) (x + 0.044715 x^3)
        act = gate * _sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    else:
        act = gate * _sigmoid(gate)
    return act * up


@triton.jit
def clamped_swiglu(gate, up, limit, alpha):
    """gpt-oss: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit), on fp32 tiles."""
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    return (up + 1.0) * gate * _sigmoid(alpha * gate)


@triton.jit
def _gated_kernel(gate_up_ptr, out_ptr, stride_g, stride_o, inter, GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_g + inter + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, gated(gate, up, GELU_TANH).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(gate_up, out, gelu_tanh):
    rows, width = gate_up.shape
    inter = width // 2
    assert gate_up.stride(-1) == 1 and width % 2 == 0
    out = gate_up.new_empty(rows, inter) if out is None else out
    _gated_kernel[(rows, triton.cdiv(inter, BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                     GELU_TANH=gelu_tanh, BLOCK=BLOCK)
    return out


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, 2 * inter] (gate | up) -> silu(gate) * up [rows, inter]."""
    return _launch(gate_up, out, False)


def gelu_tanh_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, 2 * inter] (gate | up) -> gelu_tanh(gate) * up [rows, inter] (Gemma's MLP)."""
    return _launch(gate_up, out, True)


ACTIVATIONS = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}  # by name (MaskedFFN, masked_linear's `activation`)
