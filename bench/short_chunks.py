"""Short prefill chunks as decode rows (`ModelRunner.short_chunk_rows`, from the backend) against the
prefill forward, side by side in one engine: the time to a request's first token (one request
at a time, `max_tokens` 1, greedy) for n new prompt tokens after a cached prefix of c tokens (a
conversation's next turn; c = 0: a fresh n-token prompt). Every prompt's new tokens are drawn
anew, so nothing but the prefix is ever cached; the two settings alternate A B / B A; medians.

    .venv/bin/python bench/short_chunks.py --sizes 1,4,16,32,64 --contexts 0,192,960,1920 --out bench/out
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

PREFIX = ("The history of the bicycle begins in the early nineteenth century, when inventors in Europe built "
          "machines of wood and iron that riders pushed along with their feet, long before pedals. ") * 70


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sizes", default="1,4,16,32,64", help="new prompt tokens, comma-separated")
    ap.add_argument("--contexts", default="0,192,960,1920",
                    help="cached prefix lengths, multiples of the block size (16), comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from server.config_file import load_config, preset_path

    config = load_config(preset_path(args.model))
    config.device = "cpu"
    engine = LLMEngine(config)
    runner = engine.runner
    if not runner.checks_drafts:
        sys.exit("this engine has no decode step whose rows see each other's K/V: short chunks stay prefill forwards")
    limit = runner.short_chunk_rows
    sizes = [int(s) for s in args.sizes.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    text = engine.tokenizer.encode(PREFIX)
    assert len(text) > max(contexts), "PREFIX is too short for the longest context"
    params = SamplingParams(max_tokens=1, temperature=0)
    for c in contexts:
        if c:
            engine.generate([text[:c] + [28]], params)  # the prefix cache holds its c / 16 whole blocks
    rng = random.Random(0)
    settings = {"prefill forward": 0, "decode rows": max(sizes)}  # each forced
    times: dict = {}
    for c in contexts:
        for n in sizes:
            for r in range(args.rounds):
                for name in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
                    runner.short_chunk_rows = settings[name]
                    new = [rng.randrange(100, engine.model_config.vocab_size - 100) for _ in range(n)]
                    t0 = time.perf_counter()
                    (_, _, out), = engine.generate([text[:c] + new], params)
                    times.setdefault((c, n, name), []).append(time.perf_counter() - t0)
                    assert out.cached_tokens == c, (out.cached_tokens, c)  # exactly the n new tokens computed
    runner.short_chunk_rows = limit
    lines = [f"command: bench/short_chunks.py {' '.join(sys.argv[1:])}",
             f"model {args.model}, dtype {config.dtype}, threads {config.threads or 'default'}; this host's engine "
             f"computes chunks of up to {limit} tokens as rows; medians of {args.rounds} alternated", "",
             "| cached prefix | new tokens | prefill forward (ms) | decode rows (ms) | forward / rows |",
             "|---:|---:|---:|---:|---:|"]
    data = []
    for c in contexts:
        for n in sizes:
            a, b = (statistics.median(times[(c, n, name)]) * 1e3 for name in settings)
            lines.append(f"| {c} | {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
            data.append({"cached": c, "new_tokens": n, "forward_ms": a, "rows_ms": b})
    write_report(args.out, "short_chunks", lines, data)


if __name__ == "__main__":
    main()
