"""Decode speed of a mixture of experts on the CPU, the model CPU users run most (Qwen3-30B-A3B:
3B of its 30B parameters active a token), against the read-bandwidth bound of the bytes a token
reads, dense and with a forced FFN skip, side by side in one process.

The file: Qwen3-30B-A3B's shapes (hidden 2048, 32 query heads and 4 KV heads of 128, 128 experts
of 768, 8 a token) with `--layers` of its 48 layers, in llama.cpp's layout (`qwen3moe`, each
expert kind one [experts, rows, columns] tensor), every matrix Q4_0 (one random matrix quantized
per shape by gguf-py and copied to each expert and layer: speed does not depend on the values, and
every copy is its own memory, so a token streams its experts from RAM), the router F32 as llama.cpp
keeps it, the embedded SmolLM2's tokenizer. Written once into the cache folder (about 3 GB for 8
layers). The bound counts the router and, on average, the chosen share of the experts
(`weight_bytes`), read at the bandwidth sampled in the same run (bench/bandwidth.py); at b rows a
step reads each expert any row chose once, under even routing (this file's random router) a share
1 - (1 - used / experts)^b of them (so b rows' bound is not b times one row's). Decode
only: timed from the step in which every row has its first token (bench/decode.py's
`decode_run`; a prompt's prefill sends its tokens to most of the 128 experts, and counted in, it
was a third of a 32-token run's time at batch 4).

`--shape gpt-oss-20b`: gpt-oss-20b's shapes (hidden 2880, 64 query heads and 8 KV heads of 64, 32
experts of 2880, 4 a token; sinks, biases, a 128-token window on the even layers, YaRN) with
`--layers` of its 24, as llama.cpp's converter writes it (`gpt-oss`), the experts MXFP4 (random
blocks of sane exponents: gguf-py writes no MXFP4), the other matrices Q8_0, about 0.43 GB a layer.

    .venv/bin/python bench/moe_cpu.py --layers 8 --batches 1,4
    .venv/bin/python bench/moe_cpu.py --shape gpt-oss-20b --layers 4 --batches 1,4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode import decode_run  # noqa: E402
from bench.random_model import PROMPTS, copy_tokenizer, forced_skip, load  # noqa: E402
from engine.config import EngineConfig, SkipConfig  # noqa: E402
from engine.loader import cache_root, embedded_gguf  # noqa: E402

# the shapes of the files written (of the real models' layers, `--layers` of them), and how
# llama.cpp's converter writes them: their architecture, experts' format, router bias, sinks
SHAPES = {
    "qwen3-30b-a3b": dict(arch="qwen3moe", name="Qwen3-30B-A3B", of_layers=48, hidden=2048, heads=32, kv_heads=4,
                          head_dim=128, experts=128, used=8, expert_ffn=768, matrices="Q4_0", experts_format="Q4_0",
                          rope_base=1_000_000.0, context=4096),
    "gpt-oss-20b": dict(arch="gpt-oss", name="gpt-oss-20b", of_layers=24, hidden=2880, heads=64, kv_heads=8,
                        head_dim=64, experts=32, used=4, expert_ffn=2880, matrices="Q8_0", experts_format="MXFP4",
                        rope_base=150_000.0, context=131072, window=128, yarn=(32.0, 4096)),
}


def mxfp4_blocks(rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Random MXFP4 blocks (an exponent byte, 16 bytes of nibbles a 32 weights) of about `std`: gguf-py
    writes no MXFP4. The largest value, 12 x 2^(e - 128), near 3 std."""
    blocks = rng.integers(0, 256, size=(rows, cols // 32, 17), dtype=np.uint8)
    blocks[..., 0] = 128 + int(np.floor(np.log2(3 * std / 12)))
    return blocks.reshape(rows, -1)


def write_moe_gguf(path: Path, shape: dict, layers: int) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType
    from gguf.quants import quantize

    from engine.plain_gguf_reader import PlainReader

    hidden, heads, kv_heads, head_dim = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    experts, expert_ffn, gpt_oss = shape["experts"], shape["expert_ffn"], shape["arch"] == "gpt-oss"
    fmt, expert_fmt = (GGMLQuantizationType[shape[k]] for k in ("matrices", "experts_format"))
    rng = np.random.default_rng(0)
    source = PlainReader(str(embedded_gguf("smollm2-135m-instruct")))
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    writer = GGUFWriter(str(path), shape["arch"])
    writer.add_block_count(layers)
    writer.add_context_length(shape["context"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(expert_ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(shape["rope_base"])
    writer.add_layer_norm_rms_eps(1e-6 if not gpt_oss else 1e-5)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(shape["used"])
    writer.add_expert_feed_forward_length(expert_ffn)
    writer.add_vocab_size(vocab)
    if gpt_oss:
        writer.add_sliding_window(shape["window"])
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(shape["yarn"][0])
        writer.add_rope_scaling_orig_ctx_len(shape["yarn"][1])
    copy_tokenizer(source, writer)

    quantized: dict[tuple, np.ndarray] = {}

    def matrix(rows: int, cols: int, kind=fmt, copies: int = 0) -> np.ndarray:
        """One random matrix quantized per shape and format (`copies` of it stacked: an expert kind)."""
        if (rows, cols, kind) not in quantized:
            std = cols ** -0.5
            quantized[rows, cols, kind] = mxfp4_blocks(rng, rows, cols, std) if kind.name == "MXFP4" else \
                quantize((rng.standard_normal((rows, cols)) * std).astype(np.float32), kind)
        one = quantized[rows, cols, kind]
        return np.ascontiguousarray(np.broadcast_to(one, (copies, *one.shape))) if copies else one.copy()

    def vector(size: int, mean: float = 1.0, std: float = 0.1) -> np.ndarray:
        return (mean + std * rng.standard_normal(size)).astype(np.float32)

    writer.add_tensor("token_embd.weight", matrix(vocab, hidden), raw_dtype=fmt)
    writer.add_tensor("output_norm.weight", vector(hidden))
    writer.add_tensor("output.weight", matrix(vocab, hidden), raw_dtype=fmt)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        blk = f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", vector(hidden))
        writer.add_tensor(blk + ("post_attention_norm" if gpt_oss else "ffn_norm") + ".weight", vector(hidden))
        if not gpt_oss:
            writer.add_tensor(blk + "attn_q_norm.weight", vector(head_dim))
            writer.add_tensor(blk + "attn_k_norm.weight", vector(head_dim))
        for name, rows, cols in (("attn_q", q_size, hidden), ("attn_k", kv_size, hidden),
                                 ("attn_v", kv_size, hidden), ("attn_output", hidden, q_size)):
            writer.add_tensor(blk + name + ".weight", matrix(rows, cols), raw_dtype=fmt)
            if gpt_oss:
                writer.add_tensor(blk + name + ".bias", vector(rows, 0.0, 0.1))
        if gpt_oss:
            writer.add_tensor(blk + "attn_sinks.weight", vector(heads, 0.0, 1.0))
        # the router F32 as llama.cpp keeps it; each expert kind one [experts, rows, columns] tensor
        writer.add_tensor(blk + "ffn_gate_inp.weight", (rng.standard_normal((experts, hidden)) * 0.15).astype(np.float32))
        if gpt_oss:
            writer.add_tensor(blk + "ffn_gate_inp.bias", vector(experts, 0.0, 0.1))
        for name, rows, cols in (("ffn_gate", expert_ffn, hidden), ("ffn_up", expert_ffn, hidden),
                                 ("ffn_down", hidden, expert_ffn)):
            writer.add_tensor(blk + name + "_exps.weight", matrix(rows, cols, expert_fmt, experts), raw_dtype=expert_fmt)
            if gpt_oss:
                writer.add_tensor(blk + name + "_exps.bias", (rng.standard_normal((experts, rows)) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=8, help="of the model's (Qwen3-30B-A3B: 48, gpt-oss-20b: 24)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-budget", type=float, default=0.25, help="forced: fires at the first hot layer")
    p.add_argument("--cold", type=int, default=1, help="cold layers at each end (never skipped)")
    args = p.parse_args()
    if max(map(int, args.batches.split(","))) > len(PROMPTS):
        p.error(f"--batches: at most {len(PROMPTS)} rows (a prompt of its own each)")

    folder = cache_root() / "bench-moe"
    folder.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    path = folder / f"{args.shape}-shaped-{args.layers}-layers-{shape['experts_format'].lower()}.gguf"
    if args.shape == "qwen3-30b-a3b":  # the name it was first written under
        path = folder / f"qwen3-30b-a3b-shaped-{args.layers}-layers-q4_0.gguf"
    if not path.exists():
        t = time.perf_counter()
        partial = write_moe_gguf(folder / (path.name + ".partial"), shape, args.layers)
        partial.rename(path)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    loaded = load(EngineConfig(model=str(path), device="cpu", dtype="auto", max_num_seqs=max(
        map(int, args.batches.split(","))), max_model_len=512, prefix_caching=False, cache_dir=str(folder),
        skip=SkipConfig(cold_start=args.cold, cold_end=args.cold)))
    engine, prompts, per_token = loaded.engine, loaded.prompts, loaded.per_token
    model, total, bound, bandwidth = engine.runner.model, loaded.total, loaded.bound, loaded.bandwidth
    skip = forced_skip(args.skip_budget)
    print(f"command: {' '.join(sys.argv)}")
    print(f"{shape['name']} shapes, {args.layers} of {shape['of_layers']} layers, experts {shape['experts_format']}, "
          f"other matrices {shape['matrices']}; formats {model.weight_formats()}; engine "
          f"loaded in {loaded.load_s:.1f} s; threads {torch.get_num_threads()}; a prompt a row, {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, "
          f"{args.new_tokens} new tokens (decode tok/s: prefill excluded), {args.rounds} rounds alternating, "
          f"medians; forced skip: budget "
          f"{args.skip_budget} with {args.cold} cold layers at each end")
    # a step of `b` rows reads each expert that any row chose: with routing spread evenly (this file's random
    # router), a share 1 - (1 - used / experts)^b of each layer's experts, rather than b times a row's
    routers = sum(layer.router.nbytes() for layer in model.layers)
    all_experts = (per_token["ffn"] - routers) * shape["experts"] / shape["used"]

    def step_bound(b: int) -> float:
        """tok/s at b rows that the bandwidth allows, the experts read once a step each."""
        share = 1 - (1 - shape["used"] / shape["experts"]) ** b
        return b * bandwidth * 1e9 / (total - per_token["ffn"] + routers + share * all_experts)

    print(f"weights read per token {total / 1e6:.0f} MB (FFN: router + {shape['used']} of {shape['experts']} experts "
          f"{per_token['ffn'] / 1e6:.0f}, attention {per_token['attention'] / 1e6:.0f}, lm_head "
          f"{per_token['lm_head'] / 1e6:.0f}); read bandwidth {bandwidth:.1f} GB/s -> batch-1 bound {bound:.1f} tok/s")
    # the same engine with its decode steps on the per-op path (the model's Python forward: the experts
    # one call each), where the native layer calls (engine/native/routed_experts.cpp) would take them
    native = model.fused_decode
    print("| batch | dense tok/s | of bound (experts shared) | forced skip tok/s | realized skip | skip / dense "
          "| per-op path, dense tok/s | native / per-op |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs = {"dense": (None, native), "skip": (skip, native), "per-op": (None, None)}
    for batch in map(int, args.batches.split(",")):
        for params, path in runs.values():  # warm-up
            model.fused_decode = path
            decode_run(engine, prompts[:batch], 4, params)
        tok_s, realized = {name: [] for name in runs}, []
        for r in range(args.rounds):
            for name in list(runs)[r % 3:] + list(runs)[:r % 3]:  # each run first in turn
                params, model.fused_decode = runs[name]
                speed, ratio = decode_run(engine, prompts[:batch], args.new_tokens, params)
                tok_s[name].append(speed)
                if name == "skip":
                    realized.append(ratio)
        model.fused_decode = native
        d, s, p = (statistics.median(tok_s[name]) for name in runs)
        print(f"| {batch} | {d:.1f} | {d / step_bound(batch):.0%} | {s:.1f} | {statistics.median(realized):.3f} | "
              f"{s / d:.2f}x | {p:.1f} | {d / p:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
