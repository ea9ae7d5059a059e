"""CPU ops: native kernels for norms, activations, rotary and paged decode attention when the
library loaded (fp32 activations, as on every CPU path); the torch backend's ops otherwise."""
from __future__ import annotations

import torch

from engine.backends.cpu.fused_decode import FusedDecode
from engine.backends.cpu.quant_linear import make_linear
from engine.backends.torch_backend import TorchBackend
from engine.native import kernels
from engine.native import ops as native_ops


class CPUBackend(TorchBackend):
    name = "cpu"
    prefill_as_rows = True  # False: prefill attention on SDPA, as before (bench/prefill.py compares them)

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

    def gelu_tanh_mul(self, gate_up):
        if self.native and gate_up.dtype == torch.float32:
            return native_ops.gelu_tanh_mul(gate_up)
        return super().gelu_tanh_mul(gate_up)

    def rotary(self, x, cos, sin):
        """In place on the native path: callers pass a fresh projection output and use the result.
        Tables narrower than a head turn its leading dimensions only."""
        if self.native and x.dtype == torch.float32 and x.stride(-1) == 1:
            native_ops.rope_(x[..., :cos.shape[-1]], cos[:, 0], sin[:, 0])
            return x
        return super().rotary(x, cos, sin)

    def fused_decode(self, model, kv):
        return FusedDecode(model, kv) if self.native and FusedDecode.fits(model, kv) else None

    def short_chunk_rows(self) -> int:
        """The decode step runs the forward's kernels in one native call, and since prefill attention
        runs on the decode kernel too (`attention`), a chunk's rows attend as the forward does.
        `bench/short_chunks.py` (README: "Prompt chunks as decode rows"): rows came first or
        level at every size measured, 1 to 512 new tokens after 0 to 1,920 cached, AVX-512 and AVX2
        (1.01-1.86x; AVX2 0.99x at 1,024 + 256). 512: the default step's prefill budget, the most
        measured."""
        return 512

    def attention(self, q, k, v, k_cache, v_cache, meta, scale, window, softcap=None, sinks=None):
        """The native decode kernel where it loaded (it writes the new K/V itself and reads every
        row's blocks in place), for prefill tokens too, each token a row attending to its own
        positions: a token's result then depends on its position and the cache alone, the same
        bits whether its prompt came whole, in chunks, after a cached prefix or as decode rows
        (SDPA's depend on the chunk's length), and the kernel read a prompt's keys faster than
        SDPA (README: "Prefill attention as decode rows")."""
        if not (self.native and native_ops.decode_attention_supported(q, k_cache)) or \
                (meta.is_prefill and not self.prefill_as_rows):
            return super().attention(q, k, v, k_cache, v_cache, meta, scale, window, softcap, sinks)
        if not meta.is_prefill:
            return native_ops.decode_attention(q, k, v, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                               meta.max_context_len, scale, window, softcap, sinks)
        tables, lengths, longest = meta.prefill_rows()
        return native_ops.decode_attention(q, k, v, k_cache, v_cache, tables, lengths, longest, scale, window, softcap,
                                           sinks)
