"""CPU ops: native kernels for norms, activation, rotary and paged decode attention when the
library loaded (fp32 activations, as on every CPU path); the torch backend's ops otherwise."""
from __future__ import annotations

import torch

from engine.backends.cpu.fused_decode import FusedDecode
from engine.backends.cpu.quant_linear import make_linear
from engine.backends.torch_backend import TorchBackend
from engine.native import kernels
from engine.native import ops as native_ops
from engine.native import quant_ops


class CPUBackend(TorchBackend):
    name = "cpu"

    def __init__(self):
        self.native = kernels() is not None

    def linear(self, parts: list, bias: torch.Tensor | None = None):
        """One projection from its row blocks: native / oneDNN dense GEMMs or the quantized kernel."""
        return make_linear(parts, bias)

    def rms_norm(self, x, weight, eps):
        if self.native and x.dtype == torch.float32:
            return native_ops.rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps)

    def silu_mul(self, gate_up):
        if self.native and gate_up.dtype == torch.float32:
            return native_ops.silu_mul(gate_up)
        return super().silu_mul(gate_up)

    def rotary(self, x, cos, sin):
        """In place on the native path: callers pass a fresh projection output and use the result."""
        if self.native and x.dtype == torch.float32 and x.stride(-1) == 1:
            return native_ops.rope_(x, cos[:, 0], sin[:, 0])
        return super().rotary(x, cos, sin)

    def fused_decode(self, model, kv):
        return FusedDecode(model, kv) if self.native and FusedDecode.fits(model, kv) else None

    def short_chunk_rows(self) -> int:
        """A prefill forward's fixed cost is ~10-20 ms more than a decode step's, and a row costs
        about what a prefilled token does where rows are cheap: `bench/short_chunks.py` (README:
        "Short prompt chunks as decode rows") measured 1 to 64 new tokens after a cached prefix
        1.09-2.2x sooner as rows on AVX-512, and on AVX2, where a row's int16 products take twice
        the instructions, 1.16-1.42x up to 16 tokens and 0.93-1.00x at 32 and 64."""
        return 64 if quant_ops.best_isa() == "avx512" else 16

    def attention(self, q, k, v, k_cache, v_cache, meta, scale, window):
        if meta.is_prefill or not (self.native and native_ops.decode_attention_supported(q, k_cache)):
            return super().attention(q, k, v, k_cache, v_cache, meta, scale, window)
        # the kernel writes the new K/V itself and reads every row's blocks in place
        return native_ops.decode_attention(q, k, v, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                           meta.max_context_len, scale, window)
