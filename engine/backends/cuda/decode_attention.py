"""Paged decode attention: one query token per row, keys and values read in place through the
row's block table (never gathered into a copy), in two stages.

1. `_split_kernel`, one program per (row, KV head, split): the query heads of that KV head's
   group are loaded together (GQA), so each K/V tile is read once for the whole group. A row's
   attended span [start, context_len) (start = context_len - window for sliding-window layers) is
   cut into `num_splits` equal parts computed on the device from its length, so long contexts
   spread over many programs and a CUDA graph's grid stays fixed. Each split streams its keys in
   tiles with an online softmax and stores its normalized partial output and log-sum-exp.
2. `_reduce_kernel`, one program per (row, query head): merges the splits by their log-sum-exp.

With `softcap` (Gemma 2) each score s is softcap * tanh(s / softcap) before the softmax. With
`sinks` (gpt-oss: a logit per head that joins the softmax's normalizer with no value) the merge
adds exp(sink) to the splits' summed exp(lse), which is where the whole normalizer is known. Rows
with context_len 0 (padded rows of a graph bucket) produce zeros. Nothing is written to the
cache here: the new token's K/V go in first (write_kv.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.backends.cuda.kernel_support import dot_precision, dot_size, upcast_dots

MAX_SPLITS = 16
MIN_TOKENS_PER_SPLIT = 256
TILE_TOKENS = 32


@triton.jit
def _split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, lens_ptr, part_out_ptr, part_lse_ptr,
                  stride_qn, stride_qh, stride_cb, stride_ch, stride_co, stride_tn,
                  scale, window, softcap, block_size, head_dim, num_heads,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_PAD: tl.constexpr,
                  TILE: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(lens_ptr + row)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(context_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(context_len - start, NUM_SPLITS), TILE) * TILE
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, context_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_PAD)
    heads = kv_head * GROUP + g
    gmask = g < GROUP
    dmask = d < head_dim
    q = tl.load(q_ptr + row * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_PAD), tl.float32)
    for tile_start in range(lo, hi, TILE):
        pos = tile_start + tl.arange(0, TILE)
        pmask = pos < hi
        block = tl.load(tables_ptr + row * stride_tn + pos // block_size, mask=pmask, other=0)
        base = block.to(tl.int64) * stride_cb + kv_head * stride_ch + (pos % block_size) * stride_co
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TILE], fp32
        if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh from one exp (no overflow: |s| enters negated)
            e = tl.exp(-2.0 * tl.abs(scores / softcap))
            squashed = softcap * (1.0 - e) / (1.0 + e)
            scores = tl.where(scores < 0, -squashed, squashed)
        scores = tl.where(pmask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    seen = total > 0  # an empty split (short row, or context_len 0) leaves -inf and zeros
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    part = (row * num_heads + heads) * NUM_SPLITS + split  # partials: [N, H, NUM_SPLITS] (x HEAD_PAD)
    tl.store(part_out_ptr + part[:, None] * HEAD_PAD + d[None, :], out, mask=gmask[:, None] & dmask[None, :])
    tl.store(part_lse_ptr + part, lse, mask=gmask)


@triton.jit
def _reduce_kernel(part_out_ptr, part_lse_ptr, sinks_ptr, out_ptr, stride_on, stride_oh, head_dim,
                   NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_PAD: tl.constexpr,
                   HAS_SINKS: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_PAD)
    smask = s < NUM_SPLITS
    dmask = d < head_dim
    part = (row * tl.num_programs(1) + head) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + part, mask=smask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    if HAS_SINKS:  # the sink is one more logit of the normalizer: in the max too (a padded row: its alone)
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        top = tl.maximum(top, sink)
    weight = tl.exp(lse - tl.where(top > float("-inf"), top, 0.0))  # 0 for empty splits
    total = tl.sum(weight, axis=0)
    if HAS_SINKS:
        total += tl.exp(sink - top)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_PAD + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * stride_on + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def default_num_splits(max_context_len: int) -> int:
    """Splits per row for contexts up to `max_context_len` (a graph passes its block tables' span,
    so the grid is fixed): one per MIN_TOKENS_PER_SPLIT tokens, rounded up to a power of two, at
    most MAX_SPLITS. The split count is a compile-time constant of the kernels, and an eager step's
    table width changes as contexts grow: a count per width compiled up to 16 kernel pairs, each a
    pause of the engine thread; powers of two compile 5 (a split past a row's context ends at once)."""
    return min(MAX_SPLITS, triton.next_power_of_2(max(1, triton.cdiv(max_context_len, MIN_TOKENS_PER_SPLIT))))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           window: int | None = None, num_splits: int | None = None,
                           out: torch.Tensor | None = None, softcap: float | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [N, H, D] (last dim contiguous; may be a view of a fused q|k|v projection);
    k_cache, v_cache: [blocks, KV, block_size, D] of one layer, contiguous; block_tables:
    [N, max_blocks] int32/int64 (entries past a row's length are never read); context_lens: [N]
    int (the new token included; 0 = padded row, output zeros); window: attend only to the last
    `window` positions; softcap: scores squashed to softcap * tanh(s / softcap) (Gemma 2); sinks:
    fp32 [H], a logit per head in each softmax's normalizer (gpt-oss). -> out [N, H * D] in q's dtype."""
    rows, num_heads, head_dim = q.shape
    _, num_kv, block_size, _ = k_cache.shape
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert num_heads % num_kv == 0 and block_tables.stride(-1) == 1
    group = num_heads // num_kv
    if num_splits is None:
        num_splits = default_num_splits(block_tables.shape[1] * block_size)
    head_pad = dot_size(head_dim)
    part_out = torch.empty(rows, num_heads, num_splits, head_pad, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(rows, num_heads, num_splits, device=q.device, dtype=torch.float32)
    if out is None:
        out = torch.empty(rows, num_heads, head_dim, device=q.device, dtype=q.dtype)
    out3 = out.view(rows, num_heads, head_dim)
    _split_kernel[(rows, num_kv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scale, window or 0, softcap or 1.0, block_size, head_dim, num_heads,
        GROUP=group, GROUP_PAD=dot_size(group), HEAD_PAD=head_pad, TILE=TILE_TOKENS,
        NUM_SPLITS=num_splits, HAS_WINDOW=bool(window), HAS_SOFTCAP=bool(softcap), UPCAST=upcast_dots(q),
        PRECISION=dot_precision(q),
    )
    assert sinks is None or (sinks.dtype == torch.float32 and sinks.is_contiguous() and sinks.shape == (num_heads,))
    _reduce_kernel[(rows, num_heads)](
        part_out, part_lse, part_lse if sinks is None else sinks, out3, out3.stride(0), out3.stride(1), head_dim,
        NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_PAD=head_pad,
        HAS_SINKS=sinks is not None,
    )
    return out.view(rows, num_heads * head_dim)
