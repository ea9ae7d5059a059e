"""fp32 vs bf16 weights on CPU (activations, norms, attention and KV stay fp32 in both): what bf16
costs in quality against fp32 on the same checkpoint, and what it buys in decode speed, measured
side by side in one run (speed alternating A B A B, medians).

    .venv/bin/python bench/dtype.py --out bench/out
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode import PROMPT, engine_run  # noqa: E402
from bench.quality import held_out, side_by_side  # noqa: E402
from bench.report import write_report  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from server.config_file import load_config, preset_path  # noqa: E402


def build(preset: str, dtype: str) -> LLMEngine:
    config = load_config(preset_path(preset))
    config.dtype, config.max_num_seqs, config.max_model_len = dtype, 32, 512
    config.prefix_caching = False  # every run prefills its prompt: same work for both engines
    return LLMEngine(config)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m-instruct")
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=128, help="decode length of the speed runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = p.parse_args()
    engines = {dtype: build(args.preset, dtype) for dtype in ("float32", "bfloat16")}
    tok = engines["float32"].tokenizer
    texts, prompts = held_out(tok)
    quality = side_by_side(engines["float32"], engines["bfloat16"], texts, prompts, args.gen_tokens)

    prompt = tok.encode_chat([{"role": "user", "content": PROMPT}])
    speed = {}
    for batch in (1, 4, 16):
        runs = {d: [] for d in engines}
        for _ in range(args.rounds):
            for d, e in engines.items():
                runs[d].append(engine_run(e, prompt, batch, args.new_tokens)[0])
        speed[batch] = {d: statistics.median(v) for d, v in runs.items()}

    lines = [f"command: {' '.join(sys.argv)}", f"model {args.preset}, threads {torch.get_num_threads()}, "
             f"{len(texts)} held-out texts teacher-forced, {len(prompts)} prompts x {args.gen_tokens} greedy tokens", "",
             f"bf16 vs fp32 weights: teacher-forced top-1 agreement {quality['top1_agreement']:.3f}, NLL "
             f"{quality['nll_reference']:.3f} -> {quality['nll_other']:.3f} "
             f"({quality['nll_other'] - quality['nll_reference']:+.3f}), "
             f"greedy tokens before divergence {quality['greedy_prefix_agreement']:.3f}", "",
             "| batch | fp32 tok/s | bf16 tok/s | bf16 / fp32 |", "|---:|---:|---:|---:|"]
    for batch, s in speed.items():
        lines.append(f"| {batch} | {s['float32']:.1f} | {s['bfloat16']:.1f} | {s['bfloat16'] / s['float32']:.2f}x |")
    write_report(args.out, "dtype", lines, {"command": " ".join(sys.argv), "quality": quality, "speed": speed})


if __name__ == "__main__":
    main()
