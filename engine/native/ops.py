"""Torch-facing wrappers of the C++ kernels: check layouts, pass pointers, allocate outputs."""
from __future__ import annotations

import functools

import torch

from engine.native.build import kernels


def check_decode_length(longest: int, max_len: int) -> None:
    """The kernels write each row's new K/V at position length - 1 of its slot: refuse a length past it."""
    if longest > max_len:
        raise ValueError(f"decode length {longest} exceeds the KV slot ({max_len} tokens)")


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (kernels() is not None and q.device.type == "cpu" and q.dtype == torch.float32
            and k_cache.dtype == torch.float32 and k_cache.is_contiguous())


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_ids: torch.Tensor, lengths: torch.Tensor, longest: int, scale: float,
                     window: int | None) -> torch.Tensor:
    """q: [B, H, D] fp32; k, v: [B, KV, D], the new token's, written at position lengths - 1 of each
    row's slot; caches: [slots, KV, max_len, D] of one layer; slot_ids, lengths: [B] int64, every
    length >= 1 (position + 1); longest: max(lengths), checked against the slot size -> [B, H*D]."""
    rows, heads, dim = q.shape
    check_decode_length(longest, k_cache.shape[2])
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(rows, heads * dim, dtype=q.dtype)
    kernels().decode_attention_f32(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_ids.data_ptr(),
        lengths.data_ptr(), out.data_ptr(), rows, heads, k_cache.shape[1], dim, k_cache.shape[2], window or 0, scale,
        torch.get_num_threads())
    return out


BLOCK = 16  # outputs per weight block (engine/native/tiling.h)
_LINEAR = {torch.float32: "linear_f32", torch.bfloat16: "linear_bf16"}


def linear_supported(weight: torch.Tensor) -> bool:
    """Only where the kernels are vectorized for this CPU (AVX-512 or AVX2 + FMA): elsewhere
    oneDNN is the faster choice."""
    lib = kernels()
    if lib is None or weight.device.type != "cpu" or weight.shape[0] % BLOCK:
        return False
    if weight.dtype == torch.float32:
        return bool(lib.linear_f32_vectorized())
    return weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0 and bool(lib.linear_bf16_vectorized())


def block_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> fp32: [out / 16, in, 16]; bf16: [out / 16, in / 2, 16, 2] (the layouts the kernels
    stream, see engine/native/linear*.cpp)."""
    out, inp = weight.shape
    if weight.dtype == torch.bfloat16:
        return weight.view(out // BLOCK, BLOCK, inp // 2, 2).transpose(1, 2).contiguous()
    return weight.view(out // BLOCK, BLOCK, inp).transpose(1, 2).contiguous()


def linear_kernel(dtype: torch.dtype):
    """The kernel for weights of `dtype`, bound once: a layer built on it keeps it (see `disabled()`)."""
    return getattr(kernels(), _LINEAR[dtype])


def linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None, kernel) -> torch.Tensor:
    """x: [rows, in] fp32; blocked: from `block_weight`; bias: [out] fp32 or None; kernel: from
    `linear_kernel` -> [rows, out] fp32."""
    x = x.contiguous()
    rows, inp = x.shape
    out = blocked.shape[0] * BLOCK
    y = torch.empty(rows, out, dtype=torch.float32)
    kernel(x.data_ptr(), blocked.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
           rows, inp, out, torch.get_num_threads())
    return y


def elementwise_supported(x: torch.Tensor) -> bool:
    return kernels() is not None and x.device.type == "cpu" and x.dtype == torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of an fp32 tensor of any shape (weight fp32 [dim])."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    kernels().rms_norm_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps,
                           torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] (gate | up) -> [rows, inter] = silu(gate) * up."""
    gate_up = gate_up.contiguous()
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
    kernels().silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in place on x [N, H, D] (unit stride over D); cos, sin: [N, D] -> x."""
    tokens, heads, dim = x.shape
    assert x.stride(2) == 1
    cos, sin = cos.contiguous(), sin.contiguous()
    kernels().rope_f32(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, heads, dim, x.stride(0), x.stride(1),
                       torch.get_num_threads())
    return x


class DecodeLayers:
    """Llama-family decoder layers on native calls (engine/native/decode_layers.cpp), for models
    whose projections all run on the native GEMMs: a dense decode step in one call (`dense_step`), or
    per layer the attention branch (decode) and the FFN branch (any rows) for the skip gate to
    choose between. Same kernels as the per-op path, so the same bits; built per KV cache (the
    pointer table holds its addresses)."""

    def __init__(self, cfg, layers, kv):
        self.cfg, self.kv = cfg, kv
        self.bf16 = layers[0].qkv.dtype == torch.bfloat16
        rows = []  # one row of addresses per layer, in decode_layers.cpp's `Column` order
        for i, layer in enumerate(layers):
            bias = layer.qkv.bias
            rows.append([layer.input_norm.data_ptr(), layer.post_attn_norm.data_ptr(), layer.qkv.weight.data_ptr(),
                         0 if bias is None else bias.data_ptr(), layer.o_proj.weight.data_ptr(),
                         layer.gate_up.weight.data_ptr(), layer.down.weight.data_ptr(), kv.k[i].data_ptr(),
                         kv.v[i].data_ptr()])
        self.table = torch.tensor(rows, dtype=torch.int64)
        self.layers = layers  # the table points into their tensors
        self.ffns = [functools.partial(self.ffn_branch, i) for i in range(len(layers))]

    def _row(self, layer: int) -> int:
        return self.table.data_ptr() + layer * self.table.shape[1] * self.table.element_size()

    def attention_branch(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_ids,
                         lengths, longest: int) -> torch.Tensor:
        """o_proj(attention(...)) of one layer's decode step, writing the new K/V; x: [rows, hidden]."""
        cfg = self.cfg
        check_decode_length(longest, self.kv.max_len)
        x = x.contiguous()
        out = torch.empty_like(x)
        kernels().llama_attention_branch(
            x.data_ptr(), self._row(layer), int(self.bf16), cos.data_ptr(), sin.data_ptr(), slot_ids.data_ptr(),
            lengths.data_ptr(), out.data_ptr(), x.shape[0], cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, self.kv.max_len, cfg.rms_norm_eps, cfg.head_dim ** -0.5, torch.get_num_threads())
        return out

    def ffn_branch(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """down(silu(gate) * up)(rms_norm(h)) of one layer; h: [rows, hidden], any rows."""
        cfg = self.cfg
        h = h.contiguous()
        out = torch.empty_like(h)
        kernels().llama_ffn_branch(h.data_ptr(), self._row(layer), int(self.bf16), out.data_ptr(), h.shape[0],
                                   cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps, torch.get_num_threads())
        return out

    @staticmethod
    def fits(layers, act_dtype) -> bool:
        """fp32 activations, full attention, every projection on the native GEMMs in one dtype."""
        linears = [lin for layer in layers for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
        return (act_dtype == torch.float32 and all(layer.window is None for layer in layers)
                and all(lin.backend == "native" and lin.dtype == linears[0].dtype for lin in linears))

    def dense_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_ids: torch.Tensor,
                   lengths: torch.Tensor, longest: int) -> torch.Tensor:
        """x: [rows, hidden] fp32 (embeddings), updated in place through every layer and returned."""
        cfg = self.cfg
        check_decode_length(longest, self.kv.max_len)
        x = x.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        kernels().llama_decode_layers(
            x.data_ptr(), self.table.data_ptr(), len(self.layers), int(self.bf16), cos.data_ptr(), sin.data_ptr(),
            slot_ids.data_ptr(), lengths.data_ptr(), x.shape[0], cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.intermediate_size, self.kv.max_len, cfg.rms_norm_eps, cfg.head_dim ** -0.5,
            torch.get_num_threads())
        return x
