"""Small GGUF files of architectures llama.cpp users load (Qwen3, Qwen2, Phi-3.5, Phi-4-mini, Gemma 2,
Qwen3-MoE, Mixtral, gpt-oss),
random weights, written as llama.cpp's converter lays them out (tensor names, metadata), quantized
with gguf-py's own quantizers, the tokenizer copied from the embedded SmolLM2 GGUF (three control
tokens respelled as fill-in-the-middle tokens). No model file
of these architectures ships with the product; transformers reads these files as it reads real ones,
so its model on the dequantized weights is the reference the engine is held to."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, RopeScalingType
from gguf.quants import quantize

from engine.plain_gguf_reader import PlainReader
from tests.quant_blocks import random_blocks

Q4_1, Q8_0 = GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
Q2_K, Q3_K, IQ4_NL, IQ4_XS, MXFP4 = (GGMLQuantizationType[k] for k in ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "MXFP4"))
# formats gguf-py cannot quantize to: random blocks (tests/quant_blocks.py), their fp16 fields sized
# so that the weights' spread is about the one asked for (a weight is field x ~this much at most)
RANDOM_BLOCKS = {Q2_K: 24.0, Q3_K: 100.0, IQ4_NL: 100.0, IQ4_XS: 2000.0}

# per architecture: hidden, heads, kv heads, head_dim (Qwen3's is 128 whatever the hidden size: the
# GGUF does not say, transformers takes Qwen3Config's default), q/k/v biases, per-head q/k norms,
# a separate lm_head; Phi-3.5's fused q|k|v and gate|up and its longrope factors (as tensors); Gemma 2's
# four norms a layer, soft caps and sliding window (caps and window small enough to bind here)
SHAPES = {
    "qwen3": dict(hidden=128, heads=2, kv_heads=1, head_dim=128, bias=False, qk_norm=True, tied=True),
    # (Qwen2's and Phi-4-mini's files carry the formats gguf-py cannot write too: their own blocks)
    "qwen2": dict(hidden=128, heads=4, kv_heads=2, head_dim=32, bias=True, qk_norm=False, tied=False,
                  formats={"ffn_down": (Q3_K, Q2_K), "attn_output": (IQ4_NL, Q8_0)}),
    "phi3": dict(hidden=128, heads=4, kv_heads=4, head_dim=32, bias=False, qk_norm=False, tied=False, fused=True,
                 longrope=True),
    # Phi-4-mini: Phi-3's layout with grouped kv heads, rotating the leading 3/4 of each head
    "phi4": dict(arch="phi3", hidden=128, heads=4, kv_heads=2, head_dim=32, rotary=24, bias=False, qk_norm=False,
                 tied=False, fused=True, longrope=True, formats={"ffn_down": (IQ4_XS, Q4_1)}),
    # Qwen3-MoE: Qwen3's attention, a router and EXPERTS SwiGLU experts of EXPERT_FFN a layer, USED a token
    "qwen3moe": dict(hidden=128, heads=2, kv_heads=1, head_dim=128, bias=False, qk_norm=True, tied=True, moe=True),
    # Qwen2-MoE: Qwen2's attention (q/k/v biases), the experts, and a shared expert of SHARED_FFN with a gate
    "qwen2moe": dict(hidden=128, heads=4, kv_heads=2, head_dim=32, bias=True, qk_norm=False, tied=False, moe=True,
                     shared=True),
    # Mixtral: as llama.cpp's converter writes it, a `llama` file with an expert count, the experts'
    # width its feed-forward length
    "mixtral": dict(arch="llama", hidden=128, heads=4, kv_heads=2, head_dim=32, bias=False, qk_norm=False, tied=False,
                    moe=True, mixtral=True),
    # (seed 1: seed 0's greedy text for the short prompt has few clear argmaxes for the quantized test)
    "gemma2": dict(hidden=128, heads=2, kv_heads=1, head_dim=256, bias=False, qk_norm=False, tied=True, gemma=True,
                   seed=1),
    # gpt-oss: biases on q, k, v and o, per-head sinks, sliding even layers, YaRN; a router with a bias
    # and MXFP4 experts with biases (heads narrower than hidden / heads, as gpt-oss's 64 of 2880 / 64)
    "gpt-oss": dict(hidden=128, heads=4, kv_heads=2, head_dim=48, bias=True, qk_norm=False, tied=False, moe=True,
                    gpt_oss=True, formats={name: (MXFP4, MXFP4) for name in ("ffn_gate", "ffn_up", "ffn_down")}),
}
GPT_OSS_WINDOW, GPT_OSS_YARN = 16, (32.0, 256)  # even layers' window; YaRN's factor and pretrained length
GEMMA2_CAPS, GEMMA2_WINDOW = (1.5, 8.0), 16  # attention's and the logits' soft caps; every other layer's window
EXPERTS, USED, EXPERT_FFN, SHARED_FFN = 4, 2, 64, 96
CONTEXT, ORIGINAL_CONTEXT = 131072, 4096  # Phi-3.5-mini's: longrope's factor 32
LAYERS, FFN = 4, 256
# Formats mixed within a projection as llama.cpp's Q4_K_M mixes them (q and k in 4 bits, v in 6 or
# 8 on some layers): q|k|v and gate|up are row blocks of two layouts. By tensor, then by layer (even, odd).
FORMATS = {"attn_q": (Q4_1, Q4_1), "attn_k": (Q4_1, Q4_1), "attn_v": (Q8_0, Q4_1), "attn_output": (Q8_0, Q4_1),
           "ffn_gate": (Q4_1, Q8_0), "ffn_up": (Q4_1, Q4_1), "ffn_down": (Q8_0, Q4_1)}


def write_tiny_gguf(path: Path, arch: str, tokenizer_gguf: Path, seed: int = 0, split_experts: bool = False,
                    sampling: dict | None = None) -> Path:
    """split_experts: each expert's matrix a tensor of its own (`blk.N.ffn_gate.E.weight`), as
    llama.cpp's converter wrote Mixtral before it stacked them; the same values as stacked.
    sampling: `general.sampling.*` keys (llama.cpp's: its makers' sampling), by their last part."""
    shape = SHAPES[arch]
    hidden, heads, kv_heads, head_dim = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    rng = np.random.default_rng(shape.get("seed", seed))
    formats = {**FORMATS, **shape.get("formats", {})}
    source = PlainReader(str(tokenizer_gguf))
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)

    writer = GGUFWriter(str(path), shape.get("arch", arch))
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT if shape.get("longrope") else
                              int(GPT_OSS_YARN[0] * GPT_OSS_YARN[1]) if shape.get("gpt_oss") else 4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(EXPERT_FFN if shape.get("mixtral") else FFN)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rotary = shape.get("rotary", head_dim)
    writer.add_rope_dimension_count(rotary)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    _copy_tokenizer(source, writer)
    for key, value in (sampling or {}).items():
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f"general.sampling.{key}", value)
    if shape.get("moe"):
        writer.add_expert_count(EXPERTS)
        writer.add_expert_used_count(USED)
        if not shape.get("mixtral"):
            writer.add_expert_feed_forward_length(EXPERT_FFN)
        if shape.get("shared"):
            writer.add_expert_shared_feed_forward_length(SHARED_FFN)
    if shape.get("gemma"):  # as llama.cpp's converter writes Gemma 2
        writer.add_attn_logit_softcapping(GEMMA2_CAPS[0])
        writer.add_final_logit_softcapping(GEMMA2_CAPS[1])
        writer.add_sliding_window(GEMMA2_WINDOW)
    if shape.get("gpt_oss"):  # as llama.cpp's converter writes gpt-oss
        writer.add_sliding_window(GPT_OSS_WINDOW)
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(GPT_OSS_YARN[0])
        writer.add_rope_scaling_orig_ctx_len(GPT_OSS_YARN[1])
    if shape.get("longrope"):  # as llama.cpp's converter writes a long-context Phi-3
        writer.add_rope_scaling_orig_ctx_len(ORIGINAL_CONTEXT)
        writer.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(CONTEXT / ORIGINAL_CONTEXT) / np.log(ORIGINAL_CONTEXT))))
        writer.add_sliding_window(CONTEXT * 2)

    def matrix(name: str, rows: int, cols: int, std: float, qtype=Q8_0, experts: int = 0) -> None:
        if qtype in RANDOM_BLOCKS:
            blocks = cols // (256 if qtype != IQ4_NL else 32)
            writer.add_tensor(name, random_blocks(qtype.name, rows, blocks, rng, 2 * std / RANDOM_BLOCKS[qtype]),
                              raw_dtype=qtype)
            return
        data = (rng.standard_normal((experts, rows, cols) if experts else (rows, cols)) * std).astype(np.float32)
        if experts and split_experts:
            for e in range(experts):
                writer.add_tensor(name.replace("_exps.", f".{e}."), quantize(data[e], qtype), raw_dtype=qtype)
            return
        writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    def vector(name: str, size: int, mean: float, std: float) -> None:
        writer.add_tensor(name, (mean + rng.standard_normal(size) * std).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden, 0.05 if shape["tied"] else 1.0)  # tied: the layers must outweigh it
    vector("output_norm.weight", hidden, 1.0, 0.1)
    if not shape["tied"]:
        matrix("output.weight", vocab, hidden, hidden ** -0.5)
    if shape.get("longrope"):
        writer.add_tensor("rope_factors_short.weight", rng.uniform(1.0, 3.0, rotary // 2).astype(np.float32))
        writer.add_tensor("rope_factors_long.weight", rng.uniform(1.0, 40.0, rotary // 2).astype(np.float32))
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    for i in range(LAYERS):
        blk = f"blk.{i}."
        vector(blk + "attn_norm.weight", hidden, 1.0, 0.1)
        vector(blk + ("post_attention_norm" if shape.get("gpt_oss") else "ffn_norm") + ".weight", hidden, 1.0, 0.1)
        if shape.get("gemma"):  # the attention's and the FFN's outputs normed too, at ~3x: the layers must
            # outweigh the embedding Gemma scales by sqrt(hidden), else greedy text repeats its tokens (tied head)
            vector(blk + "post_attention_norm.weight", hidden, 3.0, 0.3)
            vector(blk + "post_ffw_norm.weight", hidden, 3.0, 0.3)
        if shape.get("fused"):
            matrix(blk + "attn_qkv.weight", q_size + 2 * kv_size, hidden, hidden ** -0.5, formats["attn_v"][i % 2])
        for name, rows in (("attn_q", q_size), ("attn_k", kv_size), ("attn_v", kv_size)) * (not shape.get("fused")):
            matrix(blk + name + ".weight", rows, hidden, hidden ** -0.5, formats[name][i % 2])
            if shape["bias"]:
                vector(blk + name + ".bias", rows, 0.0, 0.5)
        matrix(blk + "attn_output.weight", hidden, q_size, q_size ** -0.5, formats["attn_output"][i % 2])
        if shape.get("gpt_oss"):
            vector(blk + "attn_output.bias", hidden, 0.0, 0.2)
            vector(blk + "attn_sinks.weight", heads, 1.0, 1.0)
        if shape["qk_norm"]:
            vector(blk + "attn_q_norm.weight", head_dim, 1.0, 0.2)
            vector(blk + "attn_k_norm.weight", head_dim, 1.0, 0.2)
        if shape.get("moe"):  # the router in F32, as llama.cpp keeps it; each expert kind one 3-D tensor
            writer.add_tensor(blk + "ffn_gate_inp.weight", (rng.standard_normal((EXPERTS, hidden)) * 0.15).astype(np.float32))
            if shape.get("gpt_oss"):
                vector(blk + "ffn_gate_inp.bias", EXPERTS, 0.0, 0.3)
            for name, rows, cols in (("ffn_gate", EXPERT_FFN, hidden), ("ffn_up", EXPERT_FFN, hidden),
                                     ("ffn_down", hidden, EXPERT_FFN)):
                matrix(blk + name + "_exps.weight", rows, cols, cols ** -0.5, formats[name][i % 2], EXPERTS)
                if shape.get("gpt_oss"):  # [experts, rows], as the converter writes the biases
                    writer.add_tensor(blk + name + "_exps.bias",
                                      (rng.standard_normal((EXPERTS, rows)) * 0.3).astype(np.float32))
            if shape.get("shared"):  # the shared expert's gate in F32 as llama.cpp keeps it ([hidden])
                vector(blk + "ffn_gate_inp_shexp.weight", hidden, 0.0, 0.3)
                for name, rows, cols in (("ffn_gate", SHARED_FFN, hidden), ("ffn_up", SHARED_FFN, hidden),
                                         ("ffn_down", hidden, SHARED_FFN)):
                    matrix(blk + name + "_shexp.weight", rows, cols, cols ** -0.5, formats[name][i % 2])
            continue
        ffn = (("ffn_up", 2 * FFN, hidden),) if shape.get("fused") else (("ffn_gate", FFN, hidden), ("ffn_up", FFN, hidden))
        for name, rows, cols in ffn + (("ffn_down", hidden, FFN),):
            matrix(blk + name + ".weight", rows, cols, cols ** -0.5, formats[name][i % 2])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# three of SmolLM2's control tokens respelled as a code model's fill-in-the-middle tokens
FIM_RESPELLED = {"<jupyter_start>": "<|fim_prefix|>", "<jupyter_text>": "<|fim_suffix|>",
                 "<jupyter_code>": "<|fim_middle|>"}


def _copy_tokenizer(source: PlainReader, writer: GGUFWriter) -> None:
    for key, field in source.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if key == "tokenizer.ggml.tokens":
            writer.add_array(key, [FIM_RESPELLED.get(t, t) for t in field.contents()])
        elif kind == GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), kind)


def quantized_tiny_engine(gguf: Path, cache_dir: Path):
    """`tiny_engine` on the file's own quantization (the CPU's quantized kernels); the test skips on a
    CPU they do not run on."""
    import pytest

    engine = tiny_engine(gguf, cache_dir, "auto")
    if not engine.runner.quantized:
        pytest.skip("no quantized kernel for this CPU (x86-64-v3 or newer) or no native library")
    return engine


def tiny_engine(gguf: Path, cache_dir: Path, dtype: str, device: str = "cpu", **config):
    """An engine on the CPU (or `device`) serving a tiny file: hot layers 1 and 2 of 4, so that a
    skipping step has layers to skip (`config`: more EngineConfig fields)."""
    from engine.config import EngineConfig, SkipConfig
    from engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(gguf), device=device, dtype=dtype, max_num_seqs=4, max_model_len=512,
                                  cache_dir=str(cache_dir), skip=SkipConfig(cold_start=1, cold_end=1),
                                  kv_capacity_tokens=None if device == "cpu" else 4 * 512, **config))
