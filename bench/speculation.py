"""Speculative decoding (n-gram lookup, `--speculative-tokens`) against decoding without drafts:
one served engine, its drafts switched off for the runs without them (two engine instances in
one process read 11-18% apart by instance alone on this host), the same requests alternated
A B, B A, ... (each goes first in half the rounds); medians of generated tok/s per task and
concurrency, draft tokens accepted, and a check that both give the same tokens (they must:
drafts change speed, never the text).

    .venv/bin/python bench/speculation.py --out bench/out
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from server.config_file import load_config, preset_path  # noqa: E402

CODE = '''def moving_average(values, window):
    """The mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    total = sum(values[:window])
    averages.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages
'''
TASKS = {  # what an answer copies from its prompt: much (copy, edit), some (summary), little (story)
    "copy": f"Repeat this code exactly, and nothing else:\n\n{CODE}",
    "edit": f"Rename the function to rolling_mean and the argument values to samples; give the whole "
            f"code:\n\n{CODE}",
    "summary": f"Explain what this code does, step by step, quoting the lines you explain:\n\n{CODE}",
    "story": "Write a short story about a lighthouse keeper.",
}


def alternate(fns: dict, rounds: int) -> dict:
    """Each function once a round, the order reversed every other round: A B, B A, A B, ..."""
    results = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            results[k].append(fns[k]())
    return results


def run(engine, prompts, params, k: int) -> tuple[float, list[list[int]], int, int]:
    """All prompts at once, with up to `k` draft tokens a step (0: none) -> (generated tok/s, each
    answer's tokens, draft tokens, accepted)."""
    engine.scheduler.speculative_tokens = k
    drafts, accepted = engine.draft_tokens_total, engine.accepted_draft_tokens_total
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t
    return (sum(len(ids) for _, ids, _ in outs) / elapsed, [ids for _, ids, _ in outs],
            engine.draft_tokens_total - drafts, engine.accepted_draft_tokens_total - accepted)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m-instruct")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per answer and step")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    config = load_config(preset_path(args.preset))
    config.prefix_caching = False  # each run computes its prompts: the same work for both
    engine = LLMEngine(replace(config, speculative_tokens=args.k))
    if not engine.speculative_tokens:
        sys.exit("speculation is off here: it needs the native CPU decode step")
    lines = [f"command: {' '.join(sys.argv)}", f"preset {args.preset}, {args.max_tokens} new tokens, greedy and "
             f"sampled (temperature 0.8, seed), k = {args.k}, medians of {args.rounds} rounds (A B, B A, ...)", "",
             "| task | sampling | concurrency | without drafts tok/s | with drafts tok/s | speedup | accepted / drafted | same tokens |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    rows = []
    for task, text in TASKS.items():
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": text}])
        for sampling, params in (("greedy", SamplingParams(max_tokens=args.max_tokens, temperature=0)),
                                 ("t=0.8", SamplingParams(max_tokens=args.max_tokens, temperature=0.8, seed=7))):
            for conc in (int(c) for c in args.concurrency.split(",")):
                prompts = [prompt] * conc
                got = {}

                def measure(name, k):
                    def fn():
                        tok_s, ids, drafted, accepted = run(engine, prompts, params, k)
                        got[name] = (ids, drafted, accepted)
                        return tok_s
                    return fn

                med = {k: statistics.median(v) for k, v in alternate(
                    {"plain": measure("plain", 0), "drafting": measure("drafting", args.k)}, args.rounds).items()}
                _, drafted, accepted = got["drafting"]
                same = got["plain"][0] == got["drafting"][0]
                rows.append(dict(task=task, sampling=sampling, concurrency=conc, **med, drafted=drafted,
                                 accepted=accepted, same=same))
                lines.append(f"| {task} | {sampling} | {conc} | {med['plain']:.1f} | {med['drafting']:.1f} | "
                             f"{med['drafting'] / med['plain']:.2f}x | {accepted} / {drafted} | {same} |")
    write_report(args.out, "speculation", lines, rows)


if __name__ == "__main__":
    main()
