"""The GEMM facts `engine/backends/cpu/linear.py` and `engine/async_engine.py` rest on, measured side by side:

1. one decode step's projections (qkv, o, gate|up, down of every layer, each layer its own weights,
   so they come cold from DRAM as in the engine), fp32 activations in and out as in the engine,
   through each backend of `engine.backends.cpu.linear.Linear`: `F.linear` on the plain layout, oneDNN
   on pre-packed weights, and skipserve's C++ kernels (`engine/native/`); fp32 and bf16 weights,
   1 to 64 rows; plus the read bandwidth of the machine measured in the same run (a 1 GiB sum);
2. the oneDNN step run from the main thread vs from a second thread after the main thread has
   already run parallel work (two OpenMP teams in one process).

    .venv/bin/python bench/gemm.py --out bench/out
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bandwidth import read_bandwidth_gbs  # noqa: E402
from bench.report import write_report  # noqa: E402
from engine import native  # noqa: E402
from engine.native import ops as native_ops  # noqa: E402
from engine.backends.cpu.linear import Linear  # noqa: E402

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads + 2 x 3 KV heads of 64
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def step_ms(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = p.parse_args()
    if native.load() is None:
        sys.exit("the native kernels did not build here (see the log); nothing to compare")
    bandwidth = read_bandwidth_gbs()
    lines = [f"command: {' '.join(sys.argv)}", f"threads {torch.get_num_threads()}, {args.layers} layers of "
             f"{SHAPES} (out, in), ms per step, median of {args.rounds}; read bandwidth {bandwidth:.1f} GB/s", "",
             "| weights | rows | F.linear, plain | oneDNN pre-packed | native | plain / native | oneDNN / native "
             "| native GB/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    report = {"command": " ".join(sys.argv), "read_bandwidth_gbs": bandwidth, "layout": [], "threads": {}}
    for dtype in (torch.float32, torch.bfloat16):
        weights = [[(torch.randn(o, i) * 0.02).to(dtype) for o, i in SHAPES] for _ in range(args.layers)]
        if not native_ops.linear_supported(weights[0][0]):
            print(f"{dtype}: no vectorized native kernel on this CPU, skipped")
            continue
        nbytes = sum(w.numel() * w.element_size() for ws in weights for w in ws)
        layers = {b: [[Linear(w, backend=b) for w in ws] for ws in weights] for b in ("plain", "onednn", "native")}
        del weights
        for rows in (1, 4, 16, 64):
            x = {i: torch.randn(rows, i) for _, i in SHAPES}
            ms = {b: step_ms(lambda: [lin(x[lin.in_features]) for ls in layers[b] for lin in ls], args.rounds)
                  for b in layers}
            report["layout"].append({"dtype": str(dtype), "rows": rows, **{f"{b}_ms": v for b, v in ms.items()}})
            lines.append(f"| {str(dtype).removeprefix('torch.')} | {rows} | {ms['plain']:.1f} | {ms['onednn']:.1f} | "
                         f"{ms['native']:.1f} | {ms['plain'] / ms['native']:.2f}x | {ms['onednn'] / ms['native']:.2f}x "
                         f"| {nbytes / ms['native'] / 1e6:.1f} |")
        del layers

    # 2. main thread vs a second thread, alternating (the main thread's team exists in both)
    packed = [[Linear((torch.randn(o, i) * 0.02).bfloat16(), backend="onednn") for o, i in SHAPES]
              for _ in range(args.layers)]
    x = {i: torch.randn(1, i) for _, i in SHAPES}
    runs = {"main": [], "thread": []}

    def run(where):
        runs[where].append(step_ms(lambda: [lin(x[lin.in_features]) for ls in packed for lin in ls], args.rounds))

    for _ in range(3):
        run("main")
        t = threading.Thread(target=run, args=("thread",))
        t.start()
        t.join()
    med = {k: statistics.median(v) for k, v in runs.items()}
    report["threads"] = med
    lines += ["", f"bf16 oneDNN, 1 row: main thread {med['main']:.1f} ms, second thread {med['thread']:.1f} ms "
              f"({med['thread'] / med['main']:.2f}x slower)"]
    write_report(args.out, "gemm", lines, report)


if __name__ == "__main__":
    main()
