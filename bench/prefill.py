"""CPU prefill: the prefill forward with its attention on torch's SDPA over each chunk (as before),
the same forward with the native decode kernel's attention, each prompt token a row
(`CPUBackend.prefill_as_rows`), and the chunks computed as decode rows in the decode step (the
served path for chunks up to `short_chunk_rows`), side by side in one engine: the time to a fresh
prompt's first token (one request at a time, `max_tokens` 1, greedy, prompt tokens drawn anew so
nothing is cached), and whether a prompt's last-token logits come out the same whole as in
forwards of 37 tokens then one decode row. The settings alternate, reversed every other round;
medians.

    .venv/bin/python bench/prefill.py --sizes 64,256,1024,2000 --out bench/out
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_report  # noqa: E402

SETTINGS = {"forward, SDPA": (False, 0), "forward, rows": (True, 0), "decode step": (True, None)}  # None: as served


def split_vs_whole(engine, ids: list[int]) -> float:
    """max |logits| difference at a prompt's last token: one prefill against chunks of 37 then
    one decode row (0.0: the same bits)."""
    runner = engine.runner
    with engine.kv_blocks([len(ids)]) as (table,):
        whole = runner.logits(runner.prefill([(ids, table, 0)]))[-1]
    with engine.kv_blocks([len(ids)]) as (table,):
        for start in range(0, len(ids) - 1, 37):
            runner.prefill([(ids[start:min(start + 37, len(ids) - 1)], table, start)])
        last = runner.logits(runner.decode([ids[-1]], [len(ids) - 1], [table]))[0]
    return (whole - last).abs().max().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sizes", default="64,256,1024,2000", help="prompt tokens, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from server.config_file import load_config, preset_path

    config = load_config(preset_path(args.model))
    config.device, config.kv_cache_dtype = "cpu", args.kv_cache_dtype
    engine = LLMEngine(config)
    runner = engine.runner
    backend, served_rows = runner.backend, runner.short_chunk_rows
    if not hasattr(backend, "prefill_as_rows"):
        sys.exit("this backend has no native prefill attention to compare")
    sizes = [int(s) for s in args.sizes.split(",")]
    params = SamplingParams(max_tokens=1, temperature=0)
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(100, engine.model_config.vocab_size - 100) for _ in range(n)]  # noqa: E731
    times: dict = {}
    differences: dict = {}
    for n in sizes:
        for name, (as_rows, _) in list(SETTINGS.items())[:2]:
            backend.prefill_as_rows = as_rows
            differences[(n, name)] = split_vs_whole(engine, draw(n))
        for r in range(args.rounds + 1):  # round 0: warm-up
            for name in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
                backend.prefill_as_rows, chunk_rows = SETTINGS[name]
                runner.short_chunk_rows = served_rows if chunk_rows is None else chunk_rows
                t0 = time.perf_counter()
                (_, _, out), = engine.generate([draw(n)], params)
                if r:
                    times.setdefault((n, name), []).append(time.perf_counter() - t0)
                assert out.cached_tokens == 0
    backend.prefill_as_rows, runner.short_chunk_rows = True, served_rows
    lines = [f"command: bench/prefill.py {' '.join(sys.argv[1:])}",
             f"model {args.model}, dtype {config.dtype}, KV cache {config.kv_cache_dtype}, threads "
             f"{config.threads or 'default'}; prefill chunks of {engine.scheduler.max_prefill_tokens}; the decode "
             f"step takes chunks of up to {served_rows}; medians of {args.rounds} alternated", "",
             "| prompt tokens | forward, SDPA (ms) | forward, rows (ms) | decode step (ms) | SDPA / rows "
             "| SDPA / decode step | served prefill tok/s | chunks vs whole, SDPA | chunks vs whole, rows |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    data = []
    for n in sizes:
        a, b, c = (statistics.median(times[(n, name)]) * 1e3 for name in SETTINGS)
        da, db = (differences[(n, name)] for name in list(SETTINGS)[:2])
        lines.append(f"| {n} | {a:.1f} | {b:.1f} | {c:.1f} | {a / b:.2f}x | {a / c:.2f}x | {n / c * 1e3:.0f} "
                     f"| {da:.2g} | {db:.2g} |")
        data.append({"prompt_tokens": n, "forward_sdpa_ms": a, "forward_rows_ms": b, "decode_step_ms": c,
                     "sdpa_difference": da, "rows_difference": db})
    write_report(args.out, "prefill", lines, data)


if __name__ == "__main__":
    main()
