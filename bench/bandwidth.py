"""The machine's memory read bandwidth, the denominator of every bandwidth bound in bench/."""
from __future__ import annotations

import statistics
import time

import torch


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes of a large fp32 tensor / the median time to sum it: a pure read stream on torch's
    threads (the median, not the best: a single quiet moment on a shared machine reads high)."""
    src = torch.ones(int(gib * 2**28))
    src.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t)
    return src.numel() * 4 / statistics.median(times) / 1e9
