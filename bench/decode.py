"""Decode speed: engine vs HF `generate` at batch 1 (and against the machine's read bandwidth),
aggregate tok/s at batch 1/4/16, dense vs FFN-skip rows, the engine with its C++ kernels vs
the same engine on torch + oneDNN only, and this tree against another commit of the engine (by
default the last one with contiguous KV slots, before the paged cache); all measured side by side
in one run (alternating A B A B, medians).

    .venv/bin/python bench/decode.py --out bench/out
    .venv/bin/python bench/decode.py --only-ab --ab-ref b2ac142   # paged blocks vs slots only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bandwidth import read_bandwidth_gbs  # noqa: E402
from engine import native  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams, SkipParams  # noqa: E402
from server.config_file import load_config, preset_path  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to bake bread."


def engine_run(engine, prompt, batch, new_tokens, skip=None) -> tuple[float, float]:
    """-> (aggregate generated tok/s, realized skip ratio)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = engine.generate([prompt] * batch, params, skip)
    dt = time.perf_counter() - t
    tokens = sum(len(ids) for _, ids, _ in outs)
    skipped = sum(o.ffn_skipped for _, _, o in outs)
    total = sum(o.ffn_total for _, _, o in outs)
    return tokens / dt, skipped / total


def decode_run(engine, prompts: list[list[int]], new_tokens, skip=None) -> tuple[float, float]:
    """A row a prompt -> (aggregate decode tok/s, realized skip ratio), timed from the step in which
    the last row got its first token: the prompts' prefill is left out (what a read-bandwidth bound
    bounds)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    batch = len(prompts)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"decode-{i}", prompt, params, skip)
    counts, last, start, base = {}, {}, None, 0
    while engine.has_work:
        for out in engine.step()[0]:
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.token_ids)
            last[out.request_id] = out
        if start is None and len(counts) == batch:
            start, base = time.perf_counter(), sum(counts.values())
    tok_s = (sum(counts.values()) - base) / (time.perf_counter() - start)
    return tok_s, sum(o.ffn_skipped for o in last.values()) / sum(o.ffn_total for o in last.values())


def hf_run(hf, prompt, new_tokens) -> float:
    ids = torch.tensor([prompt])
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)


def alternate(fns: dict, rounds: int) -> dict:
    results = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            results[k].append(fn())
    return results


# Runs inside either tree (only APIs both have): loads the engine, then per stdin line "batch
# prompt_tokens new_tokens" decodes that batch and prints its decode tok/s (time from the step in
# which the last row got its first token to the end: prefill excluded).
AB_WORKER = r"""
import json, sys, time
import torch
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from server.config_file import load_config, preset_path
config = load_config(preset_path(sys.argv[1]))
config.max_num_seqs, config.max_model_len, config.prefix_caching = 16, 2048, False
engine = LLMEngine(config)
text = open(sys.argv[2]).read() * 8  # long enough for the long-context cases (~4,000 tokens)
print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
for n, line in enumerate(sys.stdin):
    batch, prompt_tokens, new_tokens = map(int, line.split())
    prompt = engine.tokenizer.encode(text)[:prompt_tokens]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"ab{n}-{i}", prompt, params)
    counts, start, base = {}, None, 0
    while engine.has_work:
        for out in engine.step()[0]:
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.token_ids)
        if start is None and len(counts) == batch:
            start, base = time.perf_counter(), sum(counts.values())
    print(json.dumps({"tok_s": (sum(counts.values()) - base) / (time.perf_counter() - start)}), flush=True)
"""


class ABWorker:
    """The engine of one source tree in a subprocess, idle between the requests it is sent."""

    def __init__(self, tree: Path, preset: str, text: Path):
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen([sys.executable, "-c", AB_WORKER, preset, str(text)], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.threads = json.loads(self.proc.stdout.readline())["threads"]

    def run(self, batch: int, prompt_tokens: int, new_tokens: int) -> float:
        self.proc.stdin.write(f"{batch} {prompt_tokens} {new_tokens}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["tok_s"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def compare_trees(ref: str, preset: str, rounds: int, new_tokens: int, prompt_lengths: list[int]) -> list[dict]:
    """This tree vs `ref` (a commit of this repository, unpacked with `git archive`), decode tok/s
    at batch 1 and 16 for each prompt length. Each round starts both engines afresh and runs them
    one after the other, in the opposite order from the round before: on this machine the engine
    process started first ran 10-15% slower than the one started second, whatever the code (an
    A/A run of one commit against itself read 0.80-0.86 with long-lived workers, 1.10-1.15 with the
    start order swapped). The ratio is the geometric mean of the rounds' ratios over an even
    number of rounds, so that order cancels."""
    text = ROOT / "bench" / "data" / "heldout.txt"
    rounds += rounds % 2
    cases = [(batch, n) for n in prompt_lengths for batch in (1, 16)]  # (batch, prompt tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = {"this": ROOT, ref: Path(tmp)}
        print(f"\n{ref} vs this tree, decode tok/s, dense (realized skip 0), {preset}, threads "
              f"{torch.get_num_threads()}, {new_tokens} new tokens, {rounds} rounds (engines restarted each "
              f"round, order swapped)")
        print(f"| batch | prompt tokens | {ref} tok/s (median) | this tree tok/s (median) | this / {ref} |")
        print("|---:|---:|---:|---:|---:|")
        for batch, prompt_tokens in cases:
            res = {k: [] for k in trees}
            for r in range(rounds):
                order = list(trees) if r % 2 == 0 else list(trees)[::-1]
                workers = {k: ABWorker(trees[k], preset, text) for k in order}
                try:
                    for k in order:
                        workers[k].run(batch, prompt_tokens, 8)  # warm-up: first calls, page faults
                    for k in order:
                        res[k].append(workers[k].run(batch, prompt_tokens, new_tokens))
                finally:
                    for w in workers.values():
                        w.close()
            ratio = statistics.geometric_mean([a / b for a, b in zip(res["this"], res[ref])])
            med = {k: statistics.median(v) for k, v in res.items()}
            rows.append({"batch": batch, "prompt_tokens": prompt_tokens, "samples": res, **med, "ratio": ratio})
            print(f"| {batch} | {prompt_tokens} | {med[ref]:.1f} | {med['this']:.1f} | {ratio:.3f} |", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m-instruct")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--skip-budget", type=float, default=0.27, help="k = floor(budget * layers) FFNs per token")
    p.add_argument("--dtype", default=None, help="override the preset's dtype (float32, bfloat16)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-native-ab", action="store_true", help="skip the native-kernels vs torch comparison")
    p.add_argument("--ab-ref", default="b2ac142",
                   help="commit to compare this tree with (default: the last with contiguous KV slots); '' = none")
    p.add_argument("--only-ab", action="store_true", help="run only the comparison with --ab-ref")
    p.add_argument("--ab-prompt-tokens", default="64,1024", help="prompt lengths of the comparison")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = p.parse_args()

    ab_lengths = [int(n) for n in args.ab_prompt_tokens.split(",")]
    if args.only_ab:
        print(f"command: {' '.join(sys.argv)}")
        rows = compare_trees(args.ab_ref, args.preset, args.rounds, args.new_tokens, ab_lengths)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode_ab.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
        return
    config = load_config(preset_path(args.preset))
    config.max_num_seqs, config.max_model_len = 16, 512
    if args.dtype:
        config.dtype = args.dtype
    config.prefix_caching = False  # every run prefills its prompt, as HF generate does
    config.skip.max_budget = 1.0
    engine = LLMEngine(config)
    model = engine.runner.model
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    wb = model.weight_bytes()
    bytes_per_token = sum(wb.values())
    print(f"command: {' '.join(sys.argv)}")
    print(f"model {args.preset} dtype {engine.runner.dtype} device {engine.runner.device} "
          f"threads {torch.get_num_threads()} prompt {len(prompt)} tokens, {args.new_tokens} new tokens")
    print(f"weights read per token: {bytes_per_token / 1e6:.0f} MB (FFN {wb['ffn'] / 1e6:.0f}, attention "
          f"{wb['attention'] / 1e6:.0f}, lm_head {wb['lm_head'] / 1e6:.0f})")
    n = args.new_tokens
    engine_run(engine, prompt, 1, 16)  # warm-up
    report = {"command": " ".join(sys.argv), "weight_bytes": wb, "threads": torch.get_num_threads(),
              "dtype": str(engine.runner.dtype), "rows": []}

    # 1. engine vs HF generate, batch 1, same weights and dtype; the read bandwidth is sampled in
    # the same alternation (this machine's bandwidth drifts with its neighbours' load)
    fns = {"engine": lambda: engine_run(engine, prompt, 1, n)[0], "bandwidth": read_bandwidth_gbs}
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        from engine.loader import ensure_hf_dir

        dense_dir = ensure_hf_dir(engine.config.model, engine.config.cache_dir)  # HF reads dense weights
        hf = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=engine.runner.dtype).eval()
        hf_run(hf, prompt, 8)
        fns["hf_generate"] = lambda: hf_run(hf, prompt, n)
    res = alternate(fns, args.rounds)
    med = {k: statistics.median(v) for k, v in res.items()}
    bound = med["bandwidth"] * 1e9 / bytes_per_token
    report.update(bandwidth_gbs=med["bandwidth"], bound_tok_s=bound)
    print(f"read bandwidth {med['bandwidth']:.1f} GB/s (median of {args.rounds}, samples "
          f"{', '.join(f'{b:.1f}' for b in res['bandwidth'])}) -> batch-1 bound {bound:.1f} tok/s")
    print(f"\nbatch 1: engine {med['engine']:.1f} tok/s ({med['engine'] / bound:.0%} of the bandwidth bound)"
          + (f", HF generate {med['hf_generate']:.1f} tok/s, ratio {med['engine'] / med['hf_generate']:.2f}x"
             if "hf_generate" in med else ""))
    report["batch1"] = med

    # 2. aggregate throughput by batch size (dense)
    agg = {}
    for batch in (1, 4, 16):
        agg[batch] = statistics.median(engine_run(engine, prompt, batch, n)[0] for _ in range(args.rounds))
    print("aggregate: " + ", ".join(f"batch {b}: {v:.1f} tok/s ({v / agg[1]:.1f}x)" for b, v in agg.items()))
    report["aggregate"] = agg

    # 3. dense vs FFN skip, alternating
    skip = SkipParams(budget=args.skip_budget, threshold=0.0, warmup_tokens=0)  # fire on every token
    print("\n| batch | dense tok/s | skip tok/s | realized skip | speedup | skipped-bytes ceiling | "
          "speedup / ceiling | gain / ceiling gain |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 16):
        ratios = []
        res = alternate({"dense": lambda: engine_run(engine, prompt, batch, n)[0],
                         "skip": lambda: (lambda r: (ratios.append(r[1]), r[0])[1])(
                             engine_run(engine, prompt, batch, n, skip))}, args.rounds)
        dense, skipped = statistics.median(res["dense"]), statistics.median(res["skip"])
        realized = statistics.median(ratios)
        ceiling = bytes_per_token / (bytes_per_token - realized * wb["ffn"])
        speedup = skipped / dense
        row = {"batch": batch, "dense": dense, "skip": skipped, "realized": realized, "speedup": speedup,
               "ceiling": ceiling}
        report["rows"].append(row)
        print(f"| {batch} | {dense:.1f} | {skipped:.1f} | {realized:.3f} | {speedup:.3f}x | {ceiling:.3f}x | "
              f"{speedup / ceiling:.2f} | {(speedup - 1) / (ceiling - 1):.2f} |")

    # 4. native kernels (engine/native) vs the same engine on torch + oneDNN only, alternating
    if not args.no_native_ab:
        with native.disabled():
            torch_engine = LLMEngine(config)

        def torch_run(batch):
            with native.disabled():
                return engine_run(torch_engine, prompt, batch, n)[0]

        print("\n| batch | torch + oneDNN tok/s | native kernels tok/s | native / torch |")
        print("|---:|---:|---:|---:|")
        for batch in (1, 16):
            res = alternate({"torch": lambda: torch_run(batch), "native": lambda: engine_run(engine, prompt, batch, n)[0]},
                            args.rounds)
            med = {k: statistics.median(v) for k, v in res.items()}
            report.setdefault("native_ab", []).append({"batch": batch, **med})
            print(f"| {batch} | {med['torch']:.1f} | {med['native']:.1f} | {med['native'] / med['torch']:.2f}x |")
    if args.ab_ref:
        report["ab"] = compare_trees(args.ab_ref, args.preset, args.rounds, args.new_tokens, ab_lengths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
