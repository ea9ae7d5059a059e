"""Sampling cost inside real decode steps: the embedded model decodes batches of 1/16/64 rows with
each sampling setting, and the sampler's time per step is read beside the whole step's. With
`--ref COMMIT` the same measurement runs on that commit's engine too (its tree unpacked from git),
rounds alternating between the trees, and the table shows both and their ratio.

    .venv/bin/python bench/sampling.py --ref HEAD~1 --out bench/out
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a short story about a lighthouse keeper. " * 3
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature 0.7": dict(temperature=0.7),
    "temperature 0.7, top_p 0.9": dict(temperature=0.7, top_p=0.9),
    "temperature 1, top_p 0.95": dict(temperature=1.0, top_p=0.95),
    "temperature 1, top_k 40": dict(temperature=1.0, top_k=40),
    "temperature 0.8, repetition 1.1": dict(temperature=0.8, repetition_penalty=1.1),
    "temperature 1, frequency + presence 0.5": dict(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.5),
    "temperature 1, typical_p 0.95": dict(temperature=1.0, typical_p=0.95),  # over the whole vocabulary
    "temperature 0.8, top_p + typical_p 0.95": dict(temperature=0.8, top_p=0.95, typical_p=0.95),
    "LangChain's TGI example": dict(temperature=0.01, top_k=10, top_p=0.95, typical_p=0.95, repetition_penalty=1.03),
}


def measure(tree: Path, batches: list[int], new_tokens: int) -> dict:
    """In this process, on the engine of `tree` -> {batch: {setting: (sampler ms, step ms)}} per step."""
    sys.path.insert(0, str(tree))
    import engine.model_runner as runner_module
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from server.config_file import load_config, preset_path

    config = load_config(preset_path("smollm2-135m-instruct"))
    config.max_num_seqs, config.max_model_len = max(batches), 1024
    engine = LLMEngine(config)
    prompt = engine.tokenizer.encode(PROMPT)
    spent = []
    sample = runner_module.sample

    def timed(*args):
        t = time.perf_counter()
        result = sample(*args)
        spent.append(time.perf_counter() - t)
        return result

    runner_module.sample = timed

    def run(batch: int, kw: dict, tokens: int) -> tuple[float, float]:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, seed=1, **kw)
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", prompt, params)
        start = engine.generation_tokens_total
        while engine.generation_tokens_total - start < batch:  # the prefill, until every row has its first token
            engine.step()
        spent.clear()
        t = time.perf_counter()
        while engine.has_work:
            engine.step()
        return sum(spent) / len(spent) * 1e3, (time.perf_counter() - t) / len(spent) * 1e3

    taken = {f.name for f in dataclasses.fields(SamplingParams)}
    results = {}
    for batch in batches:
        results[batch] = {}
        for name, kw in SETTINGS.items():
            if not set(kw) <= taken:  # a setting an older tree's engine does not have
                results[batch][name] = (float("nan"), float("nan"))
                continue
            run(batch, kw, 2)  # warm
            results[batch][name] = run(batch, kw, new_tokens)
    return results


def measure_tree(tree: Path, batches: list[int], new_tokens: int) -> dict:
    """`measure` in a fresh process on `tree` (a model load each: the trees' engines never share one)."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(tree), "--batches",
                          ",".join(map(str, batches)), "--new-tokens", str(new_tokens)], cwd=tree, check=True,
                         capture_output=True, text=True).stdout
    return {int(b): {k: tuple(v) for k, v in row.items()} for b, row in json.loads(out.splitlines()[-1]).items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="measurements per tree (alternating); medians")
    ap.add_argument("--ref", help="a commit to measure beside this tree")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        print(json.dumps(measure(args.worker, batches, args.new_tokens)))
        return
    trees = {"this tree": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.ref:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees[args.ref] = Path(tmp)
        rounds = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                rounds[name].append(measure_tree(tree, batches, args.new_tokens))
    med = {name: {b: {s: tuple(statistics.median(r[b][s][i] for r in runs) for i in range(2)) for s in SETTINGS}
                  for b in batches} for name, runs in rounds.items()}
    lines = ["| batch | setting | " + " | ".join(f"{n}: sampler / step ms" for n in trees)
             + (" | sampler, this tree / ref |" if args.ref else " |"),
             "|---:|---|" + "---:|" * (len(trees) + bool(args.ref))]
    for b in batches:
        for s in SETTINGS:
            cells = [f"{med[n][b][s][0]:.2f} / {med[n][b][s][1]:.1f}" for n in trees]
            if args.ref:
                cells.append(f"{med['this tree'][b][s][0] / med[args.ref][b][s][0]:.2f}x")
            lines.append(f"| {b} | {s} | " + " | ".join(cells) + " |")
    if args.out:
        sys.path.insert(0, str(ROOT))  # this process measures nothing itself: the trees' engines ran in theirs
        from bench.report import write_report

        write_report(args.out, "sampling", lines, med)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
