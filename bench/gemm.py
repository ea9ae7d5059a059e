"""The GEMM facts `engine/models/linear.py` and `engine/async_engine.py` rest on, measured side by side:

1. one decode step's projections (qkv, o, gate|up, down of every layer, each layer its own weights,
   so they come cold from DRAM as in the engine): `F.linear` on the plain layout vs the same
   weights pre-packed for oneDNN (`engine.models.linear.Linear`), fp32 and bf16, at 1, 4, 16 rows;
2. the packed step run from the main thread vs from a second thread after the main thread has
   already run parallel work (two OpenMP teams in one process).

    .venv/bin/python bench/gemm.py --out bench/out
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.models.linear import Linear  # noqa: E402

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
    lines = [f"command: {' '.join(sys.argv)}", f"threads {torch.get_num_threads()}, {args.layers} layers of "
             f"{SHAPES} (out, in), ms per step, median of {args.rounds}", "",
             "| dtype | rows | F.linear, plain | oneDNN pre-packed | plain / packed |", "|---|---:|---:|---:|---:|"]
    report = {"command": " ".join(sys.argv), "layout": [], "threads": {}}
    for dtype in (torch.float32, torch.bfloat16):
        plain = [[(torch.randn(o, i) * 0.02).to(dtype) for o, i in SHAPES] for _ in range(args.layers)]
        packed = [[Linear(w) for w in ws] for ws in plain]
        for rows in (1, 4, 16):
            x = {i: torch.randn(rows, i).to(dtype) for _, i in SHAPES}
            a = step_ms(lambda: [F.linear(x[w.shape[1]], w) for ws in plain for w in ws], args.rounds)
            b = step_ms(lambda: [lin(x[lin.in_features]) for ls in packed for lin in ls], args.rounds)
            report["layout"].append({"dtype": str(dtype), "rows": rows, "plain_ms": a, "packed_ms": b})
            lines.append(f"| {str(dtype).removeprefix('torch.')} | {rows} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
        del plain, packed

    # 2. main thread vs a second thread, alternating (the main thread's team exists in both)
    packed = [[Linear((torch.randn(o, i) * 0.02).bfloat16()) for o, i in SHAPES] for _ in range(args.layers)]
    x = {i: torch.randn(1, i).bfloat16() for _, i in SHAPES}
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
    lines += ["", f"bf16 packed, 1 row: main thread {med['main']:.1f} ms, second thread {med['thread']:.1f} ms "
              f"({med['thread'] / med['main']:.2f}x slower)"]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm.json").write_text(json.dumps(report, indent=1))
    (out / "gemm.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
