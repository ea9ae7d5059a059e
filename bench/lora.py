"""What a LoRA adapter's rows cost: decode tok/s of the served model (the preset as `make serve` runs
it) with every row on the model, every row on one adapter, and half and half, at batch 1 and 16,
measured side by side in one run (modes alternated each round, medians). On the CPU a decode step
with an adapter's rows runs in the native decode step with the adapters' pairs in it, so the ratios
are the adapters' own products (prefill is left out); the adapter is random, on every layer (by
default rank 16 on all seven projections).

    .venv/bin/python bench/lora.py --out bench/out
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.loader import ensure_hf_dir  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from server.config_file import load_config, preset_path  # noqa: E402
from tests.lora_files import ATTENTION, MLP, write_adapter  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
MODES = {"model": lambda i: None, "adapter": lambda i: "bench", "half and half": lambda i: "bench" if i % 2 else None}


def decode_tok_s(engine, prompt: list[int], batch: int, new_tokens: int, adapter_of) -> float:
    """Aggregate decode tok/s of `batch` rows (row i through `adapter_of(i)`), from the step after
    the last row's first token (the prefill left out)."""
    for i in range(batch):
        engine.add_request(f"lora-{i}", prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                               ignore_eos=True, adapter=adapter_of(i)))
    made, start, counted = {}, None, 0
    while engine.has_work:
        outs = engine.step()[0]
        for out in outs:
            made[out.request_id] = made.get(out.request_id, 0) + len(out.token_ids)
        if start is None and len(made) == batch:
            start, counted = time.perf_counter(), sum(made.values())
    return (sum(made.values()) - counted) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a preset")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--modules", default=",".join(ATTENTION + MLP),
                    help="the projections the adapter changes (default: all seven; PEFT's default for Llama: "
                         "q_proj,v_proj)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for lora.md / lora.json")
    args = ap.parse_args()
    config = load_config(preset_path(args.model))
    with tempfile.TemporaryDirectory() as folder:
        shapes = ModelConfig.from_hf_dir(ensure_hf_dir(config.model, config.cache_dir, dense=False))
        write_adapter(Path(folder) / "bench", shapes, modules=tuple(args.modules.split(",")), rank=args.rank,
                      alpha=2.0 * args.rank, std=0.02)
        config.lora_modules = {"bench": str(Path(folder) / "bench")}
        engine = LLMEngine(config)
    prompt = engine.tokenizer.encode_chat(PROMPT)
    batches = [int(b) for b in args.batches.split(",")]
    results = {(b, mode): [] for b in batches for mode in MODES}
    decode_tok_s(engine, prompt, 2, 8, MODES["half and half"])  # warm-up
    for _ in range(args.rounds):
        for b in batches:
            for mode, adapter_of in MODES.items():
                if b == 1 and mode == "half and half":
                    continue
                results[b, mode].append(decode_tok_s(engine, prompt, b, args.new_tokens, adapter_of))
    lines = ["| batch | rows | decode tok/s (median) | vs the model |", "|---:|---|---:|---:|"]
    data = []
    for b in batches:
        base = statistics.median(results[b, "model"])
        for mode in MODES if b > 1 else ("model", "adapter"):  # (one row is never half and half)
            tok_s = statistics.median(results[b, mode])
            lines.append(f"| {b} | {mode} | {tok_s:.1f} | {tok_s / base:.2f}x |")
            data.append({"batch": b, "rows": mode, "tok_s": tok_s, "runs": results[b, mode]})
    write_report(args.out, "lora", lines, data)


if __name__ == "__main__":
    main()
