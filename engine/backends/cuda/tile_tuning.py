"""The masked linear's tiles, measured on the GPU at start: which tile shape streams a weight
fastest depends on the card (SM count, shared memory, memory system) and on the weight's shape,
and a decode step's FFNs are two thirds of the bytes a Llama reads per token.

For each FFN weight shape and each row tile the decode buckets use, every candidate of
masked_linear.CANDIDATES that the GPU can launch is timed on that weight (all rows running, L2
flushed between runs by Triton's `do_bench`, as a decode step meets its weights cold) and the
fastest is kept for the process (`masked_linear.use_tiles`). cuBLAS on the same product is timed
beside it for the log. Runs before the decode graphs are captured (timing synchronizes with the
host) and compiles each candidate once (Triton's disk cache keeps them for the next start).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
import torch.nn.functional as F

from engine.backends.cuda.masked_linear import CANDIDATES, Tiles, block_rows, default_tiles, masked_linear, use_tiles

log = logging.getLogger("skipserve.cuda")


def median_ms(x: torch.Tensor, weight: torch.Tensor, tiles: Tiles | None, activation: str | None) -> float:
    """The masked linear on `tiles` (None: cuBLAS's x W^T, no activation), median ms over ~25 ms
    of runs."""
    import triton.testing

    fn = ((lambda: F.linear(x[:, :weight.shape[1]], weight)) if tiles is None else
          (lambda: masked_linear(x, weight, tiles=tiles, activation=activation)))
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def tune_masked_linear(products: list[tuple[torch.Tensor, str | None]], row_counts: list[int],
                       measure: Callable[[torch.Tensor, torch.Tensor, Tiles | None, str | None], float] = median_ms
                       ) -> list[dict]:
    """Picks and sets the tiles of every distinct weight shape and dtype among `products`
    ((weight, the activation fused into its input or None)) for the row tiles of `row_counts`
    -> one report per choice: shape, rows, tiles, its time, the default tiles' and cuBLAS's (ms).
    A candidate that does not launch (shared memory, registers) is passed over."""
    t0 = time.perf_counter()
    reports, seen = [], set()
    for weight, activation in products:
        for rows in sorted({block_rows(n) for n in row_counts}):
            key = (*weight.shape, weight.dtype, rows, activation)
            if key in seen:
                continue
            seen.add(key)
            width = weight.shape[1] * (1 if activation is None else 2)
            x = torch.randn(rows, width, device=weight.device, dtype=weight.dtype)
            times: dict[Tiles, float] = {}
            default = default_tiles(rows, weight.element_size(), activation is not None)
            for tiles in CANDIDATES + (default,):
                if tiles in times:
                    continue
                try:
                    times[tiles] = measure(x, weight, tiles, activation)
                except Exception as exc:  # out of shared memory or registers on this card: not a candidate
                    log.debug("masked linear tiles %s do not run on %s: %r", tiles, tuple(weight.shape), exc)
            if not times:
                continue
            best = min(times, key=times.get)
            use_tiles(weight, rows, activation, best)
            reports.append(dict(shape=tuple(weight.shape), rows=rows, tiles=best, ms=times[best],
                                default_ms=times.get(default),
                                cublas_ms=measure(x, weight, None, None)))
    for r in reports:
        t = r["tiles"]
        log.info("masked linear %s x %d rows: tiles %dx%d, %d warps, %d stages: %.1f us (default tiles %s us, "
                 "cuBLAS %.1f us)", "x".join(map(str, r["shape"])), r["rows"], t.block_n, t.block_k, t.num_warps,
                 t.num_stages, r["ms"] * 1e3, "-" if r["default_ms"] is None else f"{r['default_ms'] * 1e3:.1f}",
                 r["cublas_ms"] * 1e3)
    log.info("masked linear tiles tuned for %d shapes in %.1f s", len(reports), time.perf_counter() - t0)
    return reports
