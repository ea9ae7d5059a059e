"""GGUF formats the quantized kernels took late (Q2_K, Q3_K: repacked into the 8-bit layout without
loss; IQ4_NL, IQ4_XS, MXFP4: their nibbles kept as indices into their table of values) against
where such matrices ran before: dequantized to fp32 at load and multiplied by the native fp32 GEMM. Per format, 7B-shaped projections (4096 x 4096, random
valid blocks: the speed of these kernels does not depend on the values) at 1 and 16 rows, `--layers`
of them run in turn so that the weights stream from memory as a model's do (not from the cache):
bytes held per projection, and the time of one product, the two alternating, medians of the rounds.

    .venv/bin/python bench/low_bits.py --out bench/out
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402
from engine import native  # noqa: E402
from engine.backends.cpu.quant_linear import make_linear  # noqa: E402
from engine.native import quant_ops  # noqa: E402
from engine.quant.formats import BLOCK_BYTES, BLOCK_WEIGHTS, to_weight  # noqa: E402
from tests.quant_blocks import random_blocks  # noqa: E402

FORMATS = ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "MXFP4")


def timed(layers: list, x: torch.Tensor, repeats: int) -> float:
    """Seconds per product: `repeats` passes over the layers, best of three (after one warm-up)."""
    for layer in layers:
        layer(x)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            for layer in layers:
                layer(x)
        times.append((time.perf_counter() - start) / (repeats * len(layers)))
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="outputs and inputs of the projection")
    parser.add_argument("--layers", type=int, default=8, help="projections run in turn (fp32: 64 MiB each)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    native.load()
    if quant_ops.best_isa() is None:
        sys.exit("no quantized kernel for this CPU (x86-64-v3 or newer) or no native library")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = args.size
    lines = [f"# Low-bit GGUF formats: quantized kernel ({quant_ops.best_isa()}) vs fp32 dense, {n} x {n}, "
             f"{args.layers} in turn, {torch.get_num_threads()} threads", "",
             "| format | file bytes | held now | held before (fp32) | rows | fp32 ms | quantized ms | "
             "speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    data = {}
    for kind in FORMATS:
        weights = [to_weight(kind, random_blocks(kind, n, n // BLOCK_WEIGHTS[kind], rng), n)
                   for _ in range(args.layers)]
        quantized = [make_linear([w]) for w in weights]
        dense = [make_linear([w.dequantize()]) for w in weights]
        file_bytes = n * (n // BLOCK_WEIGHTS[kind]) * BLOCK_BYTES[kind]
        for rows in (1, 16):
            x = torch.randn(rows, n)
            pairs = [(timed(dense, x, 3), timed(quantized, x, 3)) for _ in range(args.rounds)]  # alternating
            fp32_s, quant_s = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            held, before = quantized[0].nbytes(), dense[0].nbytes()
            data[f"{kind}/{rows}"] = {"file_bytes": file_bytes, "held_bytes": held, "fp32_bytes": before,
                                      "fp32_s": fp32_s, "quantized_s": quant_s}
            lines.append(f"| {kind} | {file_bytes / 2**20:.1f} MiB | {held / 2**20:.1f} MiB | "
                         f"{before / 2**20:.1f} MiB | {rows} | {fp32_s * 1e3:.2f} | {quant_s * 1e3:.2f} | "
                         f"{fp32_s / quant_s:.2f}x |")
    write_report(args.out, "low_bits", lines, data)


if __name__ == "__main__":
    main()
