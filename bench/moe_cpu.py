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
(`weight_bytes`), read at the bandwidth sampled in the same run (bench/bandwidth.py). Decode
only: timed from the step in which every row has its first token (bench/decode.py's
`decode_run`; a prompt's prefill sends its tokens to most of the 128 experts, and counted in, it
was a third of a 32-token run's time at batch 4).

    .venv/bin/python bench/moe_cpu.py --layers 8 --batches 1,4
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

from bench.bandwidth import read_bandwidth_gbs  # noqa: E402
from bench.decode import decode_run  # noqa: E402
from engine.config import EngineConfig, SkipConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.loader import cache_root, embedded_gguf  # noqa: E402
from engine.sampling_params import SkipParams  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, USED, EXPERT_FFN = 2048, 32, 4, 128, 128, 8, 768
PROMPT = "Write a long story about a dragon who learns to bake bread."


def write_moe_gguf(path: Path, layers: int) -> Path:
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    from engine.plain_gguf_reader import PlainReader

    q4, rng = GGMLQuantizationType.Q4_0, np.random.default_rng(0)
    source = PlainReader(str(embedded_gguf("smollm2-135m-instruct")))
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    writer = GGUFWriter(str(path), "qwen3moe")
    for key, value in (("block_count", layers), ("context_length", 4096), ("embedding_length", HIDDEN),
                       ("feed_forward_length", 6144), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS), ("attention.key_length", HEAD_DIM),
                       ("attention.value_length", HEAD_DIM), ("rope.dimension_count", HEAD_DIM),
                       ("expert_count", EXPERTS), ("expert_used_count", USED),
                       ("expert_feed_forward_length", EXPERT_FFN), ("vocab_size", vocab)):
        writer.add_uint32(f"qwen3moe.{key}", value)
    writer.add_float32("qwen3moe.rope.freq_base", 1_000_000.0)
    writer.add_float32("qwen3moe.attention.layer_norm_rms_epsilon", 1e-6)
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            if field.types[0] == GGUFValueType.ARRAY:
                writer.add_array(key, field.contents())
            else:
                writer.add_key_value(key, field.contents(), field.types[0])

    quantized: dict[tuple[int, int], np.ndarray] = {}

    def q4_0(rows: int, cols: int, copies: int = 0) -> np.ndarray:
        if (rows, cols) not in quantized:
            quantized[rows, cols] = quantize((rng.standard_normal((rows, cols)) * cols ** -0.5).astype(np.float32), q4)
        one = quantized[rows, cols]
        return np.ascontiguousarray(np.broadcast_to(one, (copies, *one.shape))) if copies else one.copy()

    def norm(size: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    writer.add_tensor("token_embd.weight", q4_0(vocab, HIDDEN), raw_dtype=q4)
    writer.add_tensor("output_norm.weight", norm(HIDDEN))
    writer.add_tensor("output.weight", q4_0(vocab, HIDDEN), raw_dtype=q4)
    for i in range(layers):
        blk = f"blk.{i}."
        for name, size in (("attn_norm", HIDDEN), ("ffn_norm", HIDDEN), ("attn_q_norm", HEAD_DIM),
                           ("attn_k_norm", HEAD_DIM)):
            writer.add_tensor(blk + name + ".weight", norm(size))
        for name, rows, cols in (("attn_q", HEADS * HEAD_DIM, HIDDEN), ("attn_k", KV_HEADS * HEAD_DIM, HIDDEN),
                                 ("attn_v", KV_HEADS * HEAD_DIM, HIDDEN), ("attn_output", HIDDEN, HEADS * HEAD_DIM)):
            writer.add_tensor(blk + name + ".weight", q4_0(rows, cols), raw_dtype=q4)
        writer.add_tensor(blk + "ffn_gate_inp.weight", (rng.standard_normal((EXPERTS, HIDDEN)) * 0.15).astype(np.float32))
        for name, rows, cols in (("ffn_gate", EXPERT_FFN, HIDDEN), ("ffn_up", EXPERT_FFN, HIDDEN),
                                 ("ffn_down", HIDDEN, EXPERT_FFN)):
            writer.add_tensor(blk + name + "_exps.weight", q4_0(rows, cols, EXPERTS), raw_dtype=q4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="of Qwen3-30B-A3B's 48")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-budget", type=float, default=0.25, help="forced: fires at the first hot layer")
    p.add_argument("--cold", type=int, default=1, help="cold layers at each end (never skipped)")
    args = p.parse_args()

    folder = cache_root() / "bench-moe"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"qwen3-30b-a3b-shaped-{args.layers}-layers-q4_0.gguf"
    if not path.exists():
        t = time.perf_counter()
        partial = write_moe_gguf(folder / (path.name + ".partial"), args.layers)
        partial.rename(path)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="auto", max_num_seqs=max(
        map(int, args.batches.split(","))), max_model_len=512, prefix_caching=False, cache_dir=str(folder),
        skip=SkipConfig(cold_start=args.cold, cold_end=args.cold)))
    load_s = time.perf_counter() - t
    model = engine.runner.model
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    per_token = model.weight_bytes()
    total = sum(per_token.values())
    bandwidth = read_bandwidth_gbs()
    bound = bandwidth * 1e9 / total
    skip = SkipParams(budget=args.skip_budget, threshold=-1.0, warmup_tokens=0)
    print(f"command: {' '.join(sys.argv)}")
    print(f"Qwen3-30B-A3B shapes, {args.layers} of 48 layers, Q4_0; formats {model.weight_formats()}; engine "
          f"loaded in {load_s:.1f} s; threads {torch.get_num_threads()}; prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens (decode tok/s: prefill excluded), {args.rounds} rounds alternating, "
          f"medians; forced skip: budget "
          f"{args.skip_budget} with {args.cold} cold layers at each end")
    print(f"weights read per token {total / 1e6:.0f} MB (FFN: router + {USED} of {EXPERTS} experts "
          f"{per_token['ffn'] / 1e6:.0f}, attention {per_token['attention'] / 1e6:.0f}, lm_head "
          f"{per_token['lm_head'] / 1e6:.0f}); read bandwidth {bandwidth:.1f} GB/s -> batch-1 bound {bound:.1f} tok/s")
    # the same engine with its decode steps on the per-op path (the model's Python forward: the experts
    # one call each), where the native layer calls (engine/native/routed_experts.cpp) would take them
    native = model.fused_decode
    print("| batch | dense tok/s | of bound (x batch) | forced skip tok/s | realized skip | skip / dense "
          "| per-op path, dense tok/s | native / per-op |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs = {"dense": (None, native), "skip": (skip, native), "per-op": (None, None)}
    for batch in map(int, args.batches.split(",")):
        for params, path in runs.values():  # warm-up
            model.fused_decode = path
            decode_run(engine, prompt, batch, 4, params)
        tok_s, realized = {name: [] for name in runs}, []
        for r in range(args.rounds):
            for name in list(runs)[r % 3:] + list(runs)[:r % 3]:  # each run first in turn
                params, model.fused_decode = runs[name]
                speed, ratio = decode_run(engine, prompt, batch, args.new_tokens, params)
                tok_s[name].append(speed)
                if name == "skip":
                    realized.append(ratio)
        model.fused_decode = native
        d, s, p = (statistics.median(tok_s[name]) for name in runs)
        print(f"| {batch} | {d:.1f} | {d / (bound * batch):.0%} | {s:.1f} | {statistics.median(realized):.3f} | "
              f"{s / d:.2f}x | {p:.1f} | {d / p:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
