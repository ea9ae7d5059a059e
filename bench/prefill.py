"""CPU prefill attention: SDPA over each prompt chunk (torch's, as before) against the native decode
kernel with each prompt token a row (`CPUBackend.prefill_as_rows`), side by side in one engine:
the time to a fresh prompt's first token (one request at a time, `max_tokens` 1, greedy, prompt
tokens drawn anew so nothing is cached), and whether a prompt's last-token logits come out the
same whole as in chunks of 37 tokens then one decode row. The two settings alternate A B / B A;
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

SETTINGS = {"SDPA": False, "rows": True}


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
    backend = engine.runner.backend
    if not hasattr(backend, "prefill_as_rows"):
        sys.exit("this backend has no native prefill attention to compare")
    sizes = [int(s) for s in args.sizes.split(",")]
    params = SamplingParams(max_tokens=1, temperature=0)
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(100, engine.model_config.vocab_size - 100) for _ in range(n)]  # noqa: E731
    times: dict = {}
    differences: dict = {}
    for n in sizes:
        for name, rows in SETTINGS.items():
            backend.prefill_as_rows = rows
            differences[(n, name)] = split_vs_whole(engine, draw(n))
            engine.generate([draw(n)], params)  # warm-up
        for r in range(args.rounds):
            for name in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
                backend.prefill_as_rows = SETTINGS[name]
                t0 = time.perf_counter()
                (_, _, out), = engine.generate([draw(n)], params)
                times.setdefault((n, name), []).append(time.perf_counter() - t0)
                assert out.cached_tokens == 0
    backend.prefill_as_rows = True
    lines = [f"command: bench/prefill.py {' '.join(sys.argv[1:])}",
             f"model {args.model}, dtype {config.dtype}, KV cache {config.kv_cache_dtype}, threads "
             f"{config.threads or 'default'}; medians of {args.rounds} alternated", "",
             "| prompt tokens | SDPA (ms) | rows (ms) | SDPA / rows | rows' prefill tok/s "
             "| chunks vs whole, SDPA | chunks vs whole, rows |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    data = []
    for n in sizes:
        a, b = (statistics.median(times[(n, name)]) * 1e3 for name in SETTINGS)
        da, db = (differences[(n, name)] for name in SETTINGS)
        lines.append(f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {n / b * 1e3:.0f} | {da:.2g} | {db:.2g} |")
        data.append({"prompt_tokens": n, "sdpa_ms": a, "rows_ms": b, "sdpa_difference": da, "rows_difference": db})
    write_report(args.out, "prefill", lines, data)


if __name__ == "__main__":
    main()
