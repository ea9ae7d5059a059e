"""The torch backend: every op in plain torch, on any device. It is the reference the native CPU
kernels are tested against, the CPU's path where those kernels are unavailable, and on CUDA the
prefill path and the decode path of models the CUDA decode step does not take (engine/backends/cuda).

Paged attention here gathers each sequence's blocks into a contiguous copy before attending. That
is correct on any device but costs a copy of the history per layer and step; the CPU backend's
native kernel reads the blocks in place, and so does the CUDA decode step's Triton kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kv.cache import loaded, stored
from engine.kv.metadata import AttentionMetadata


class PlainLinear:
    """y = x W^T + b with F.linear, casting x to the weight's dtype and back where they differ."""

    backend = "plain"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.dtype, self.weight = weight.dtype, weight
        self.bias = None if bias is None else bias.to(weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            return F.linear(x.to(self.dtype), self.weight, self.bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def numel(self) -> int:
        return self.out_features * self.in_features

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @property
    def format(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def gather_blocks(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """cache [blocks, KV, bs, D], tables [..., M] -> [..., KV, M * bs, D] (a copy)."""
    got = cache[tables]  # [..., M, KV, bs, D]
    *lead, m, kv, bs, d = got.shape
    return got.transpose(-3, -4).reshape(*lead, kv, m * bs, d)


class TorchBackend:
    name = "torch"
    # whether decode attention reads K/V through the block tables in place (else each decode row's
    # blocks are gathered into a copy: KV capacity planning reserves room for a full batch of them)
    decode_reads_kv_in_place = False
    # whether a prompt's first chunk (no window) is SDPA's `is_causal` rather than a mask: CUDA's flash
    # kernel takes grouped KV heads but no mask, and with one SDPA falls back to its math path (the
    # whole fp32 score matrix); the CPU keeps the mask's bits
    causal_prefill = False

    def linear(self, parts: list, bias: torch.Tensor | None = None):
        """One projection from its row blocks (q|k|v, gate|up, or one matrix), dense tensors (only the
        CPU backend reads quantized blocks: the runner loads them for the CPU only)."""
        return PlainLinear(parts[0] if len(parts) == 1 else torch.cat(parts), bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, weight.shape, weight, eps)  # bit-identical to HF's fp32 formula

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[N, 2 * inter] (gate | up) -> silu(gate) * up."""
        gate, up = gate_up.chunk(2, -1)
        return F.silu(gate) * up

    def gelu_tanh_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[N, 2 * inter] (gate | up) -> gelu_tanh(gate) * up (Gemma's MLP)."""
        gate, up = gate_up.chunk(2, -1)
        return F.gelu(gate, approximate="tanh") * up

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [N, H, D]; cos, sin: [N, 1, R] (HF's rotate_half layout over each head's leading
        R <= D dimensions; the others pass through: Phi-4-mini's partial rotary)."""
        width = cos.shape[-1]
        if width < x.shape[-1]:
            return torch.cat([self.rotary(x[..., :width], cos, sin), x[..., width:]], dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def prepare(self, model) -> None:
        """Lays the loaded model's weights out for this backend's kernels, before the KV cache is
        sized from the memory left (nothing to do here)."""

    def fused_decode(self, model, kv):
        """A whole-model decode step in fewer calls, where the backend has one (None: per op). The
        model calls it with the step's embeddings, metadata and gate."""
        return None

    def short_chunk_rows(self) -> int:
        """A prefill chunk of n tokens is computed as n decode rows of its sequence where n <= this,
        if the backend's fused decode step writes every row's K/V before any row attends; 0: every
        chunk takes the prefill forward."""
        return 0

    def decode_step(self, model, kv, config, policy):
        """A whole decode step from the host's inputs (token ids, positions, block tables, gate),
        taken before the model's forward where the backend has one (None: the model's forward);
        `config` (EngineConfig) sizes it, `policy` names the skip rule it runs."""
        return None

    def attention(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None,
                  softcap: float | None = None, sinks: torch.Tensor | None = None):
        """q: [N, H, D]; k, v: [N, KV, D] (written into the cache first); caches: [blocks, KV, bs, D]
        of one layer -> [N, H*D]. `softcap`: scores s become softcap * tanh(s / softcap) before the
        mask and the softmax (Gemma 2). `sinks` [H] (gpt-oss): a logit per head that joins each
        softmax's normalizer with no value."""
        write_kv(k, v, k_cache, v_cache, meta)
        if meta.is_prefill:
            return prefill_attention(q, k, v, k_cache, v_cache, meta, scale, window, softcap, sinks,
                                     self.causal_prefill)
        return self.decode_attention(q, k, v, k_cache, v_cache, meta, scale, window, softcap, sinks)

    def decode_attention(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, window, softcap=None,
                         sinks=None):
        rows, num_heads, head_dim = q.shape
        num_kv = k.shape[1]
        keys = loaded(gather_blocks(k_cache, meta.block_tables), q.dtype)  # [B, KV, L, D]
        values = loaded(gather_blocks(v_cache, meta.block_tables), q.dtype)
        q = q.view(rows, num_kv, num_heads // num_kv, head_dim)
        scores = soft_capped(torch.matmul(q, keys.transpose(-1, -2)).mul_(scale), softcap).add_(meta.decode_mask(window))
        probs = softmax_with_sinks(scores, None if sinks is None else sinks.view(num_kv, -1, 1)).to(values.dtype)
        return torch.matmul(probs, values).reshape(rows, num_heads * head_dim)  # [B, KV, G, D] -> [B, H*D]


def write_kv(k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
    """The new keys and values into their blocks, as the cache holds them (`stored`)."""
    k_cache[meta.write_blocks, :, meta.write_offsets] = stored(k, k_cache.dtype)
    v_cache[meta.write_blocks, :, meta.write_offsets] = stored(v, v_cache.dtype)


def soft_capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap * tanh(scores / softcap), in place; the scores as they are without a cap."""
    return scores.div_(softcap).tanh_().mul_(softcap) if softcap else scores


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dimension in fp32; with `sinks` (broadcast against scores[..., :1]) one
    more logit joins each normalizer, its own probability dropped."""
    if sinks is None:
        return scores.softmax(dim=-1, dtype=torch.float32)
    with_sink = torch.cat([scores.float(), sinks.float().expand(*scores.shape[:-1], 1)], dim=-1)
    return with_sink.softmax(dim=-1)[..., :-1]


SCORES_BYTES = 256 * 2**20  # fp32 scores the written-out attention holds at once (64 heads x a long prompt)


def written_out_attention(q, keys, values, allowed, scale, softcap, sinks):
    """SDPA's product, for what it does not take (soft-capped scores, sinks): q [H, n, D], keys and
    values [KV, L, D], allowed [n, L] bool -> [H, n, D]; queries in runs whose scores fit SCORES_BYTES."""
    group = q.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    sinks = None if sinks is None else sinks.view(-1, 1, 1)
    run = max(1, SCORES_BYTES // (4 * q.shape[0] * keys.shape[1]))
    outs = []
    for at in range(0, q.shape[1], run):
        scores = soft_capped(torch.matmul(q[:, at:at + run], keys.transpose(-1, -2)).mul_(scale), softcap)
        probs = softmax_with_sinks(scores.masked_fill_(~allowed[at:at + run], float("-inf")), sinks)
        outs.append(torch.matmul(probs.to(values.dtype), values))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def prefill_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, window, softcap=None, sinks=None,
                      causal: bool = False):
    """Attention per sequence: over its fresh K/V when it starts at 0, else over its blocks. Fresh
    K/V are taken as the cache holds them (an fp16 cache rounds them, an int8 one quantizes them), so
    a whole prefill attends over the values a later chunk, or a request that finds this prefix
    cached, reads back. `causal`: a sequence's first chunk without a window as SDPA's `is_causal`."""
    sizes = [seg.num_tokens for seg in meta.segments]
    outs = []
    if k_cache.dtype != k.dtype:
        k, v = loaded(stored(k, k_cache.dtype), q.dtype), loaded(stored(v, v_cache.dtype), q.dtype)
    for i, (seg, qs, ks, vs) in enumerate(zip(meta.segments, q.split(sizes), k.split(sizes), v.split(sizes))):
        if seg.start == 0:
            keys, values = ks.transpose(0, 1), vs.transpose(0, 1)
        else:  # a cached prefix or an earlier chunk sits in the blocks
            keys = loaded(gather_blocks(k_cache, seg.block_table)[:, :seg.end], q.dtype)
            values = loaded(gather_blocks(v_cache, seg.block_table)[:, :seg.end], q.dtype)
        if softcap or sinks is not None:
            out = written_out_attention(qs.transpose(0, 1), keys, values, meta.prefill_mask(i, window), scale, softcap,
                                        sinks)
        else:
            plain = causal and seg.start == 0 and not window  # (queries = keys: top-left causal is the mask)
            out = F.scaled_dot_product_attention(qs.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0),
                                                 values.unsqueeze(0),
                                                 attn_mask=None if plain else meta.prefill_mask(i, window),
                                                 is_causal=plain, scale=scale, enable_gqa=True)[0]
        outs.append(out.transpose(0, 1).reshape(seg.num_tokens, -1))  # [H, n, D] -> [n, H*D]
    return torch.cat(outs) if len(outs) > 1 else outs[0]
