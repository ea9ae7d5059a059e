"""The CPU KV cache's element types side by side (`--kv-cache-dtype float16`, the default for a GGUF,
against `int8`, rows of int8 with a scale per 32 values): what int8 costs in quality, and what it
buys in memory and in decode speed at long contexts, where decode attention reads the cache of
every row's whole history each step. One run, speed alternating A B / B A, medians; decode only
(timed from the step in which every row has its first token).

    .venv/bin/python bench/kv_cache.py --out bench/out
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode import decode_run  # noqa: E402
from bench.quality import held_out, side_by_side  # noqa: E402
from bench.report import write_report  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from server.config_file import load_config, preset_path  # noqa: E402

DTYPES = ("float16", "int8")


def build(preset: str, kv_dtype: str, rows: int, max_len: int) -> LLMEngine:
    """rows: at least the held-out texts, which are teacher-forced in one batch."""
    config = load_config(preset_path(preset))
    config.device, config.kv_cache_dtype = "cpu", kv_dtype
    config.max_num_seqs, config.max_model_len = rows, max_len
    config.prefix_caching = False  # every run prefills its prompts: the same work for both engines
    return LLMEngine(config)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m-instruct")
    p.add_argument("--contexts", default="64,1024,2000", help="prompt tokens of each row, comma-separated")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=48, help="greedy tokens a prompt for the quality check")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    engines = {d: build(args.preset, d, max(8, *batches), max(contexts) + args.new_tokens + 16) for d in DTYPES}
    first = engines[DTYPES[0]]
    texts, prompts = held_out(first.tokenizer)
    quality = side_by_side(engines["float16"], engines["int8"], texts, prompts, args.gen_tokens)
    memory = {d: e.runner.kv.nbytes / e.runner.capacity.tokens for d, e in engines.items()}

    # long prompts: the held-out texts end to end, repeated, each row starting at another place
    stream = [t for text in texts for t in text]
    stream *= -(-2 * max(contexts) // len(stream))
    speed = {}
    for ctx in contexts:
        for batch in batches:
            rows = [stream[i * 97:i * 97 + ctx] for i in range(batch)]
            assert all(len(r) == ctx for r in rows)
            runs = {d: [] for d in engines}
            for r in range(args.rounds):
                for d in (DTYPES if r % 2 == 0 else DTYPES[::-1]):
                    runs[d].append(decode_run(engines[d], rows, args.new_tokens)[0])
            speed[f"{ctx}x{batch}"] = {d: statistics.median(v) for d, v in runs.items()}
            print(ctx, batch, speed[f"{ctx}x{batch}"], flush=True)

    lines = [f"command: {' '.join(sys.argv)}",
             f"model {args.preset}, weights {first.runner.model.weight_formats()}, threads {torch.get_num_threads()}; "
             f"{len(texts)} held-out texts teacher-forced, {len(prompts)} prompts x {args.gen_tokens} greedy tokens", "",
             f"KV bytes a token: float16 {memory['float16']:.0f}, int8 {memory['int8']:.0f} "
             f"({memory['int8'] / memory['float16']:.4f}x)",
             f"int8 vs float16 cache: teacher-forced top-1 agreement {quality['top1_agreement']:.3f}, NLL "
             f"{quality['nll_reference']:.4f} -> {quality['nll_other']:.4f} "
             f"({quality['nll_other'] - quality['nll_reference']:+.4f}), greedy tokens before divergence "
             f"{quality['greedy_prefix_agreement']:.3f}", "",
             "| context | batch | float16 tok/s | int8 tok/s | int8 / float16 |", "|---:|---:|---:|---:|---:|"]
    for key, s in speed.items():
        ctx, batch = key.split("x")
        lines.append(f"| {ctx} | {batch} | {s['float16']:.1f} | {s['int8']:.1f} | {s['int8'] / s['float16']:.2f}x |")
    write_report(args.out, "kv_cache", lines,
                 {"command": " ".join(sys.argv), "quality": quality, "speed": speed, "bytes_per_token": memory})


if __name__ == "__main__":
    main()
