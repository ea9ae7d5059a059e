"""Torch-facing wrappers of the C++ kernels: check layouts, pass pointers, allocate outputs."""
from __future__ import annotations

import functools

import torch

from engine.kv import int8_rows
from engine.native.build import kernels


def check_decode_lengths(longest: int, block_tables: torch.Tensor, block_size: int) -> None:
    """The kernels write each row's new K/V at position length - 1 through its block table: refuse a
    length past the table."""
    if longest > block_tables.shape[1] * block_size:
        raise ValueError(f"decode length {longest} exceeds the block table ({block_tables.shape[1]} blocks of "
                         f"{block_size} tokens)")


def cache_dtypes() -> tuple[torch.dtype, ...]:
    """KV cache dtypes the native decode attention reads: fp32, int8 rows (engine/kv/int8_rows.py),
    and fp16 where the build has F16C."""
    lib = kernels()
    return () if lib is None else _cache_dtypes_of(lib)


@functools.cache
def _cache_dtypes_of(lib) -> tuple[torch.dtype, ...]:  # asked once per library, not per layer and step
    return (torch.float32, torch.int8, torch.float16) if lib.decode_attention_fp16_cache() else (torch.float32, torch.int8)


def cache_bits(cache: torch.Tensor) -> int:
    return cache.element_size() * 8


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (kernels() is not None and q.device.type == "cpu" and q.dtype == torch.float32
            and k_cache.dtype in cache_dtypes() and k_cache.is_contiguous())


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, lengths: torch.Tensor, longest: int, scale: float,
                     window: int | None, softcap: float | None = None, sinks: torch.Tensor | None = None,
                     lib=None) -> torch.Tensor:
    """q: [B, H, D] fp32; k, v: [B, KV, D], the new token's, written at position lengths - 1 of each
    row; caches: [blocks, KV, block_size, D] of one layer (fp32, fp16, or int8 rows); block_tables: [B, max blocks] int32;
    lengths: [B] int32, every length >= 1 (position + 1); longest: max(lengths), checked against the
    table; softcap: scores squashed to softcap * tanh(s / softcap) (Gemma 2); sinks: fp32 [H], a logit per
    head in each softmax's normalizer (gpt-oss); lib: another build of the kernels than the process's
    (tests: the AVX2 one) -> [B, H*D]. An int8 cache holds rows of int8_rows.row_bytes(D)."""
    rows, heads, dim = q.shape
    block_size = k_cache.shape[2]
    check_decode_lengths(longest, block_tables, block_size)
    # the kernel reads and writes through raw pointers: what it takes, checked, not assumed
    if not (block_tables.dtype == lengths.dtype == torch.int32 and block_tables.is_contiguous()
            and lengths.is_contiguous() and v_cache.dtype == k_cache.dtype and v_cache.is_contiguous()
            and k.dtype == v.dtype == torch.float32 and heads % k_cache.shape[1] == 0
            and (sinks is None or (sinks.dtype == torch.float32 and sinks.is_contiguous() and sinks.shape == (heads,)))
            and k_cache.shape[-1] == (int8_rows.row_bytes(dim) if k_cache.dtype == torch.int8 else dim)
            and (k_cache.dtype != torch.int8 or int8_rows.supported(dim))):
        raise ValueError("decode attention takes contiguous int32 block tables and lengths, caches of one dtype "
                         "(int8: rows of a head dim that is a multiple of 32, with their scales), fp32 keys and "
                         "values, query heads a multiple of the KV heads, and fp32 sinks a head")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(rows, heads * dim, dtype=q.dtype)
    (lib or kernels()).decode_attention_f32(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        lengths.data_ptr(), out.data_ptr(), rows, heads, k_cache.shape[1], dim, block_size, block_tables.shape[1],
        window or 0, scale, softcap or 0.0, None if sinks is None else sinks.data_ptr(), cache_bits(k_cache),
        torch.get_num_threads())
    return out


BLOCK = 16  # outputs per weight block (engine/native/tiling.h)
_LINEAR = {torch.float32: "linear_f32", torch.bfloat16: "linear_bf16"}


def linear_supported(weight: torch.Tensor) -> bool:
    """Only where the kernels are vectorized for this CPU (AVX-512 or AVX2 + FMA): elsewhere
    oneDNN is the faster choice. Any number of outputs (`block_weight` pads them to whole blocks)."""
    lib = kernels()
    if lib is None or weight.device.type != "cpu":
        return False
    if weight.dtype == torch.float32:
        return bool(lib.linear_f32_vectorized())
    return weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0 and bool(lib.linear_bf16_vectorized())


def padded_outputs(out: int) -> int:
    """Outputs rounded up to whole blocks: the width the kernels compute and a blocked weight holds."""
    return -(-out // BLOCK) * BLOCK


def block_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> fp32: [blocks, in, 16]; bf16: [blocks, in / 2, 16, 2] (the layouts the kernels
    stream, see engine/native/linear*.cpp); outputs past `out` in the last block are zero rows (a
    mixture's router of 8 or 60 experts)."""
    out, inp = weight.shape
    if padded_outputs(out) != out:
        weight = torch.cat([weight, weight.new_zeros(padded_outputs(out) - out, inp)])
    blocks = weight.shape[0] // BLOCK
    if weight.dtype == torch.bfloat16:
        return weight.view(blocks, BLOCK, inp // 2, 2).transpose(1, 2).contiguous()
    return weight.view(blocks, BLOCK, inp).transpose(1, 2).contiguous()


def block_bias(bias: torch.Tensor | None, out: int) -> torch.Tensor | None:
    """A bias for `block_weight`'s layout: fp32, zeros past `out` in the last block."""
    if bias is None:
        return None
    return torch.cat([bias.float(), bias.new_zeros(padded_outputs(out) - out, dtype=torch.float32)])


def linear_kernel(dtype: torch.dtype):
    """The kernel for weights of `dtype`, bound once: a layer built on it keeps it (see `disabled()`)."""
    return getattr(kernels(), _LINEAR[dtype])


def linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None, kernel,
           out: int | None = None) -> torch.Tensor:
    """x: [rows, in] fp32; blocked: from `block_weight`; bias: fp32 [the blocks' outputs] or None;
    kernel: from `linear_kernel`; out: the outputs wanted, the first of the blocks' (default: all)
    -> [rows, out] fp32."""
    x = x.contiguous()
    rows, inp = x.shape
    width = blocked.shape[0] * BLOCK
    if inp != blocked.shape[1] * (2 if blocked.dim() == 4 else 1) or bias is not None and bias.numel() != width:
        raise ValueError(f"linear: input of width {inp} or bias of {bias.numel() if bias is not None else 0} "
                         f"for a weight of shape {tuple(blocked.shape)}")
    y = torch.empty(rows, width, dtype=torch.float32)
    kernel(x.data_ptr(), blocked.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
           rows, inp, width, torch.get_num_threads())
    return y if out in (None, width) else y[:, :out].contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of an fp32 tensor of any shape (weight fp32 [dim])."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    kernels().rms_norm_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps,
                           torch.get_num_threads())
    return out


def _gated(kernel: str, gate_up: torch.Tensor) -> torch.Tensor:
    gate_up = gate_up.contiguous()
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
    getattr(kernels(), kernel)(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] (gate | up) -> [rows, inter] = silu(gate) * up."""
    return _gated("silu_mul_f32", gate_up)


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] (gate | up) -> [rows, inter] = gelu_tanh(gate) * up."""
    return _gated("gelu_tanh_mul_f32", gate_up)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in place on x [N, H, D] (unit stride over D); cos, sin: [N, D] -> x."""
    tokens, heads, dim = x.shape
    assert x.stride(2) == 1
    cos, sin = cos.contiguous(), sin.contiguous()
    kernels().rope_f32(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, heads, dim, x.stride(0), x.stride(1),
                       torch.get_num_threads())
    return x
