"""Decode and prefill speed of a 7B-class dense model on the CPU, the size CPU users run with
llama.cpp, against the read-bandwidth bound of the bytes a token reads, dense and with a forced FFN
skip, side by side in one process. The embedded models are 135M and 270M: their matrices are a
few MB each; a 7B-class model's are 10-30x larger, and a token reads GBs.

The file: Llama-3-8B's shapes (hidden 4096, 32 query and 8 KV heads of 128, FFN 14336, 32 layers)
or Llama-3.2-3B's, in llama.cpp's layout (`llama`), the formats llama.cpp's Q4_K_M gives
(Q4_K matrices; Q6_K for attn_v and ffn_down in its `use_more_bits` layers and for the output),
random blocks of sane scales (gguf-py writes no K-quants; speed does not depend on the values), one
random matrix per shape and format copied to each layer (each copy its own memory, so a token
streams every layer from RAM), the embedded SmolLM2's tokenizer (so a vocabulary of 49,152 where
Llama 3 has 128,256: the embedding and output are smaller than the real model's). Written once into
the cache folder (4.3 GB for Llama-3-8B's shapes); its path is printed, so `bench/serve.py` can
serve it against llama-server:

    .venv/bin/python bench/dense_cpu.py --shape llama-3-8b --batches 1,4 --prefill 512
    .venv/bin/python bench/dense_cpu.py --shape llama-3-8b --write-only   # the file's path
"""
from __future__ import annotations

import argparse
import random
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
from engine.sampling_params import SamplingParams  # noqa: E402

SHAPES = {
    "llama-3-8b": dict(name="Llama-3-8B", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                       rope_base=500_000.0, context=8192),
    "llama-3.2-3b": dict(name="Llama-3.2-3B", layers=28, hidden=3072, heads=24, kv_heads=8, head_dim=128, ffn=8192,
                         rope_base=500_000.0, context=8192),
}
def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the layers whose attn_v and ffn_down Q4_K_M gives Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def k_quant_blocks(rng, kind: str, rows: int, cols: int, std: float) -> np.ndarray:
    """Random Q4_K or Q6_K blocks (256 weights each) whose values are about `std`, zero-centred."""
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144 if kind == "Q4_K" else 210), dtype=np.uint8)
    if kind == "Q4_K":  # w = d * sc * q - dmin * m, sc and m 6-bit (~31 on average), q 4-bit (~7.5)
        d = np.float16(std / (31 * 4.6))
        halves = np.array([d, d * 7.5], dtype=np.float16).view(np.uint8)
        blocks[..., 0:4] = halves
    else:  # w = d * scale * (q - 32), scale int8 (~74 in magnitude), q 6-bit (~18 from 32 in magnitude)
        blocks[..., 208:210] = np.array([std / (74 * 18)], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def write_dense_gguf(path: Path, shape: dict) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter

    from engine.plain_gguf_reader import PlainReader

    hidden, heads, kv_heads, head_dim, ffn = (shape[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn"))
    layers = shape["layers"]
    rng = np.random.default_rng(0)
    source = PlainReader(str(embedded_gguf("smollm2-135m-instruct")))
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(shape["context"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(shape["rope_base"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    copy_tokenizer(source, writer)

    made: dict[tuple, np.ndarray] = {}

    def matrix(name: str, rows: int, cols: int, kind: str = "Q4_K") -> None:
        if (rows, cols, kind) not in made:
            made[rows, cols, kind] = k_quant_blocks(rng, kind, rows, cols, cols ** -0.5)
        writer.add_tensor(name, made[rows, cols, kind].copy(), raw_dtype=GGMLQuantizationType[kind])

    def vector(name: str, size: int) -> None:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden)
    vector("output_norm.weight", hidden)
    matrix("output.weight", vocab, hidden, "Q6_K")
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        blk, more = f"blk.{i}.", "Q6_K" if more_bits(i, layers) else "Q4_K"
        vector(blk + "attn_norm.weight", hidden)
        vector(blk + "ffn_norm.weight", hidden)
        matrix(blk + "attn_q.weight", q_size, hidden)
        matrix(blk + "attn_k.weight", kv_size, hidden)
        matrix(blk + "attn_v.weight", kv_size, hidden, more)
        matrix(blk + "attn_output.weight", hidden, q_size)
        matrix(blk + "ffn_gate.weight", ffn, hidden)
        matrix(blk + "ffn_up.weight", ffn, hidden)
        matrix(blk + "ffn_down.weight", hidden, ffn, more)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def shaped_file(shape_name: str) -> Path:
    """The file of `shape_name`'s shapes, written on first use."""
    folder = cache_root() / "bench-dense"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{shape_name}-shaped-q4_k_m.gguf"
    if not path.exists():
        t = time.perf_counter()
        partial = write_dense_gguf(folder / (path.name + ".partial"), SHAPES[shape_name])
        partial.rename(path)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def prefill_seconds(engine, tokens: int, rng: random.Random) -> float:
    """Time to the first token of a fresh prompt of `tokens` random ids (nothing cached)."""
    ids = [rng.randrange(1000, 40000) for _ in range(tokens)]
    engine.add_request(f"prefill-{rng.random()}", ids, SamplingParams(temperature=0.0, max_tokens=1))
    t = time.perf_counter()
    while engine.has_work:
        engine.step()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="llama-3-8b")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill timing (0: none)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-budget", type=float, default=0.25, help="forced: fires at the first hot layer")
    p.add_argument("--write-only", action="store_true", help="write the file, print its path, stop")
    args = p.parse_args()
    batches = list(map(int, args.batches.split(",")))
    if max(batches) > len(PROMPTS):
        p.error(f"--batches: at most {len(PROMPTS)} rows (a prompt of its own each)")
    path = shaped_file(args.shape)
    if args.write_only:
        print(path)
        return
    shape = SHAPES[args.shape]
    loaded = load(EngineConfig(model=str(path), device="cpu", dtype="auto", max_num_seqs=max(batches),
                               max_model_len=max(1024, args.prefill + 64), prefix_caching=False,
                               cache_dir=str(path.parent), skip=SkipConfig(cold_start=1, cold_end=1)))
    engine, prompts, per_token = loaded.engine, loaded.prompts, loaded.per_token
    model, total, bound = engine.runner.model, loaded.total, loaded.bound
    skip = forced_skip(args.skip_budget)
    ceiling = total / (total - args.skip_budget * per_token["ffn"])
    print(f"command: {' '.join(sys.argv)}")
    print(f"{shape['name']} shapes (vocabulary 49,152), formats {model.weight_formats()}; engine loaded in "
          f"{loaded.load_s:.1f} s; threads {torch.get_num_threads()}; {args.new_tokens} new tokens (decode tok/s: prefill "
          f"excluded), {args.rounds} rounds alternating, medians; forced skip: budget {args.skip_budget}, 1 cold "
          f"layer at each end")
    print(f"weights read per token {total / 1e6:.0f} MB (FFN {per_token['ffn'] / 1e6:.0f}, attention "
          f"{per_token['attention'] / 1e6:.0f}, lm_head {per_token['lm_head'] / 1e6:.0f}); read bandwidth "
          f"{loaded.bandwidth:.1f} GB/s -> batch-1 bound {bound:.2f} tok/s; skipped-bytes ceiling of the skip ~{ceiling:.2f}x")
    print("| batch | dense tok/s | of bound (batch 1) | forced skip tok/s | realized skip | skip / dense |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        decode_run(engine, prompts[:batch], 2, None)  # warm-up
        dense, skipping, realized = [], [], []
        for r in range(args.rounds):
            for name in ("dense", "skip")[::(1 if r % 2 == 0 else -1)]:
                speed, ratio = decode_run(engine, prompts[:batch], args.new_tokens, skip if name == "skip" else None)
                (skipping if name == "skip" else dense).append(speed)
                if name == "skip":
                    realized.append(ratio)
        d, s = statistics.median(dense), statistics.median(skipping)
        print(f"| {batch} | {d:.2f} | {d / (batch * bound):.0%} | {s:.2f} | {statistics.median(realized):.3f} | "
              f"{s / d:.2f}x |", flush=True)
    if args.prefill:
        rng = random.Random(0)
        prefill_seconds(engine, 32, rng)  # warm-up
        times = [prefill_seconds(engine, args.prefill, rng) for _ in range(args.rounds)]
        median = statistics.median(times)
        print(f"prefill of a fresh {args.prefill}-token prompt to its first token: {median:.2f} s "
              f"({args.prefill / median:.1f} tok/s; runs {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
