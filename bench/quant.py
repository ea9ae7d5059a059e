"""The GGUF served in its own quantization (`--dtype auto` on the CPU) against the same file
dequantized to fp32 (`--dtype float32`), side by side in one run:

1. RSS after load, each in a fresh process, beside the GGUF's size and the KV cache;
2. one decode step's projections (every layer's qkv, o, gate|up, down) alone: the fp32 native
   GEMM vs each build of the quantized kernel this CPU runs, at 1 and 16 rows, with the read
   bandwidth measured in the same run;
3. decode tok/s at batch 1 and 16, the two engines alternating (A B A B), medians and the ratio;
4. a forced FFN skip (budget 0.25, firing at once) at batch 1 on the quantized weights against the
   ceiling its skipped bytes allow.

    .venv/bin/python bench/quant.py --out bench/out
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bandwidth import read_bandwidth_gbs  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.decode import PROMPT, alternate, engine_run  # noqa: E402
from engine import native  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.loader import resolve_model_path  # noqa: E402
from engine.backends.cpu.quant_linear import QuantLinear  # noqa: E402
from engine.native import quant_ops  # noqa: E402
from engine.sampling_params import SkipParams  # noqa: E402
from server.config_file import load_config, preset_path  # noqa: E402

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def build(preset: str, dtype: str, batch: int, max_len: int) -> LLMEngine:
    config = load_config(preset_path(preset))
    config.dtype, config.max_num_seqs, config.max_model_len = dtype, batch, max_len
    config.prefix_caching = False  # every run prefills its prompt
    config.skip.max_budget = 1.0
    return LLMEngine(config)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_after_load(preset: str, dtype: str, batch: int, max_len: int) -> dict:
    """Load in a fresh process (so nothing else counts) and read its RSS."""
    proc = subprocess.run([sys.executable, __file__, "--rss-child", dtype, "--preset", preset, "--batch", str(batch),
                           "--max-len", str(max_len)], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_projections_ms(linears: list, rows: int, rounds: int) -> float:
    xs = {lin.in_features: torch.randn(rows, lin.in_features) for lin in linears}

    def step():
        for lin in linears:
            lin(xs[lin.in_features])

    step()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def projections(model) -> list:
    return [lin for layer in model.layers for lin in (layer.qkv, layer.o_proj, *model.ffn_linears(layer))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m-instruct")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        engine = build(args.preset, args.rss_child, args.batch, args.max_len)
        print(json.dumps({"rss_mb": rss_mb(), "kv_mb": engine.runner.kv.nbytes / 2**20,
                          "quantized": engine.runner.quantized}))
        return

    native.load()
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
                .split(":")[1].split())
    lines = [f"command: {' '.join(sys.argv)}",
             f"model {args.preset}, threads {torch.get_num_threads()}, CPU flags: "
             f"{' '.join(f for f in CPU_FLAGS if f in flags)}; quantized kernel builds this CPU runs: "
             f"{', '.join(quant_ops.isas()) or 'none'}"]
    report = {"command": " ".join(sys.argv), "threads": torch.get_num_threads(), "cpu_flags": sorted(flags & set(CPU_FLAGS))}

    # 1. RSS after load, fresh processes
    gguf_mb = resolve_model_path(args.preset).stat().st_size / 2**20
    rss = {dtype: rss_after_load(args.preset, dtype, args.batch, args.max_len) for dtype in ("auto", "float32")}
    report["rss"] = {"gguf_mb": gguf_mb, **rss}
    lines += ["", f"RSS after load ({args.batch} KV slots x {args.max_len} tokens = {rss['auto']['kv_mb']:.0f} MiB of KV; "
              f"GGUF {gguf_mb:.0f} MiB): quantized {rss['auto']['rss_mb']:.0f} MiB "
              f"(GGUF + KV + {rss['auto']['rss_mb'] - gguf_mb - rss['auto']['kv_mb']:.0f} MiB), "
              f"fp32 {rss['float32']['rss_mb']:.0f} MiB (its KV cache: {rss['float32']['kv_mb']:.0f} MiB)"]

    engines = {"quantized": build(args.preset, "auto", args.batch, args.max_len),
               "fp32": build(args.preset, "float32", args.batch, args.max_len)}
    if not engines["quantized"].runner.quantized:
        sys.exit("this CPU or build has no quantized kernel: nothing to compare")
    wb = {k: e.runner.model.weight_bytes() for k, e in engines.items()}
    per_token = {k: sum(v.values()) for k, v in wb.items()}
    lines.append("weights read per token: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in per_token.items())
                 + "; kernels: " + ", ".join(f"{f} -> {b}" for f, b in
                                             engines["quantized"].runner.model.weight_formats().items()))

    # 2. a step's projections alone, per kernel
    bandwidth = read_bandwidth_gbs()
    kernels = {"fp32 native": projections(engines["fp32"].runner.model)}
    for isa in quant_ops.isas():
        kernels[f"quantized {isa}"] = [QuantLinear(lin.weight, lin.bias, isa) for lin in
                                       projections(engines["quantized"].runner.model)]
    lines += ["", f"one decode step's projections alone, ms (median of 7); read bandwidth {bandwidth:.1f} GB/s", "",
              "| kernel | MB read | 1 row ms | 1 row GB/s | 16 rows ms |", "|---|---:|---:|---:|---:|"]
    report["projections"] = []
    for name, linears in kernels.items():
        mb = sum(lin.nbytes() for lin in linears) / 1e6
        one, sixteen = step_projections_ms(linears, 1, 7), step_projections_ms(linears, 16, 7)
        report["projections"].append({"kernel": name, "mb": mb, "ms_1": one, "ms_16": sixteen})
        lines.append(f"| {name} | {mb:.0f} | {one:.1f} | {mb / one:.1f} | {sixteen:.1f} |")

    # 3. decode A/B
    engine_q = engines["quantized"]
    prompt = engine_q.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    for e in engines.values():
        engine_run(e, prompt, 1, 8)  # warm-up
    lines += ["", f"decode, {args.new_tokens} new tokens, prompt {len(prompt)} tokens, tok/s (median of "
              f"{args.rounds}, alternating)", "", "| batch | fp32 | quantized | quantized / fp32 |", "|---:|---:|---:|---:|"]
    report["decode"] = []
    for batch in (1, args.batch):
        res = alternate({k: (lambda e=e: engine_run(e, prompt, batch, args.new_tokens)[0]) for k, e in engines.items()},
                        args.rounds)
        med = {k: statistics.median(v) for k, v in res.items()}
        report["decode"].append({"batch": batch, **med})
        lines.append(f"| {batch} | {med['fp32']:.1f} | {med['quantized']:.1f} | {med['quantized'] / med['fp32']:.2f}x |")

    # 4. forced FFN skip on the quantized weights, batch 1
    skip = SkipParams(budget=0.25, threshold=0.0, warmup_tokens=0)
    ratios = []

    def skipped_run():
        tok_s, ratio = engine_run(engine_q, prompt, 1, args.new_tokens, skip)
        ratios.append(ratio)
        return tok_s

    res = alternate({"dense": lambda: engine_run(engine_q, prompt, 1, args.new_tokens)[0], "skip": skipped_run},
                    args.rounds)
    dense, skipped, realized = (statistics.median(v) for v in (res["dense"], res["skip"], ratios))
    ceiling = per_token["quantized"] / (per_token["quantized"] - realized * wb["quantized"]["ffn"])
    speedup = skipped / dense
    report["skip"] = {"dense": dense, "skip": skipped, "realized": realized, "ceiling": ceiling}
    lines += ["", f"forced FFN skip on the quantized weights, batch 1: dense {dense:.1f} tok/s, skip {skipped:.1f} "
              f"tok/s at realized ratio {realized:.3f}: {speedup:.3f}x vs a skipped-bytes ceiling of {ceiling:.3f}x "
              f"({(speedup - 1) / (ceiling - 1):.0%} of the gain)"]
    write_report(args.out, "quant", lines, report)


if __name__ == "__main__":
    main()
