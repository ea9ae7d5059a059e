"""The masked linear's tiles, measured on the GPU at start, and whether the dense decode step
should run an FFN product on them or on cuBLAS: which streams a weight fastest depends on the card
(SM count, shared memory, memory system) and on the weight's shape, and a decode step's FFNs are
two thirds of the bytes a Llama reads per token.

For each FFN product of the step (its weight, row mask, residual and fused activation: the very
kernel build the step launches) and each row tile the decode buckets use, every candidate of
masked_linear.CANDIDATES that the GPU can launch is timed (all rows running, L2 flushed between
runs by Triton's `do_bench`, as a decode step meets its weights cold) and the fastest is kept for
the process (`masked_linear.use_tiles`); so is the same product as the dense step runs it on
cuBLAS (the activation kernel first, the residual added in the GEMM's epilogue). `prefer_masked`
tells the dense step which of the two was faster; until a product is tuned (CPU, the
interpreter) cuBLAS. A second engine in the process reuses what the first measured. Runs before
the decode graphs are captured (timing synchronizes with the host) and compiles each candidate
once (Triton's disk cache keeps them for the next start).
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from engine.backends.cuda.gated_activation import ACTIVATIONS
from engine.backends.cuda.masked_linear import (CANDIDATES, Tiles, block_rows, default_tiles, masked_linear,
                                                tuning_key, use_tiles)

log = logging.getLogger("skipserve.cuda")
_reports: dict[tuple, dict] = {}  # tuning_key -> what tune_masked_linear measured for it


@dataclass
class MaskedProduct:
    """A masked linear as the decode step launches it (the same compiled kernel is timed)."""

    weight: torch.Tensor
    activation: str | None = None  # fused into a gate|up input
    residual: bool = False


def cublas_product(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                   activation: str | None = None) -> torch.Tensor:
    """A masked product with every row running, as the dense step computes it on cuBLAS."""
    if activation is not None:
        x = ACTIVATIONS[activation](x)
    return F.linear(x, weight) if residual is None else torch.addmm(residual, x, weight.t())


def prefer_masked(weight: torch.Tensor, rows: int, activation: str | None) -> bool:
    """Whether the masked kernel ran this product faster than cuBLAS on this card (False until tuned)."""
    report = _reports.get(tuning_key(weight, rows, activation))
    return report is not None and report["ms"] < report["cublas_ms"]


def median_ms(launch: Callable[[], object], product: MaskedProduct, rows: int, tiles: Tiles | None) -> float:
    """`launch`'s median time in ms over ~25 ms of runs (L2 flushed before each)."""
    import triton.testing

    return triton.testing.do_bench(launch, warmup=5, rep=25, return_mode="median")


def tune_masked_linear(products: list[MaskedProduct], row_counts: list[int],
                       measure: Callable[[Callable[[], object], MaskedProduct, int, Tiles | None], float] = median_ms
                       ) -> list[dict]:
    """Picks and sets the tiles of each product for the row tiles of `row_counts`, unless this
    process has them already -> one report per product and row tile: shape, rows, tiles, its
    time, the default tiles' and cuBLAS's (ms), and whether it was measured now. A candidate that
    does not launch (shared memory, registers) is passed over."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    t0 = time.perf_counter()
    reports = []
    for p in products:
        weight, (n_out, k_in) = p.weight, p.weight.shape
        for rows in sorted({block_rows(n) for n in row_counts}):
            key = tuning_key(weight, rows, p.activation)
            if key in _reports:
                reports.append(dict(_reports[key], measured=False))
                continue
            x = torch.randn(rows, k_in * (1 if p.activation is None else 2), device=weight.device, dtype=weight.dtype)
            run = torch.ones(rows, device=weight.device, dtype=torch.int32)  # every row computed
            residual = torch.zeros(rows, n_out, device=weight.device, dtype=weight.dtype) if p.residual else None
            times: dict[Tiles, float] = {}
            default = default_tiles(rows, weight.element_size(), p.activation is not None)
            for tiles in CANDIDATES + (default,):
                if tiles in times:
                    continue
                launch = functools.partial(masked_linear, x, weight, run, residual, tiles=tiles, activation=p.activation)
                try:
                    times[tiles] = measure(launch, p, rows, tiles)
                except (OutOfResources, PTXASError, CompilationError) as exc:  # not for this card
                    log.debug("masked linear tiles %s do not run on %s: %r", tiles, tuple(weight.shape), exc)
            if not times:
                continue
            best = min(times, key=times.get)
            use_tiles(weight, rows, p.activation, best)
            cublas = measure(functools.partial(cublas_product, x, weight, residual, p.activation), p, rows, None)
            _reports[key] = dict(shape=(n_out, k_in), rows=rows, tiles=best, ms=times[best],
                                 default_ms=times.get(default), cublas_ms=cublas)
            reports.append(dict(_reports[key], measured=True))
    for r in reports:
        t = r["tiles"]
        log.info("masked linear %s x %d rows: tiles %dx%d, %d warps, %d stages: %.1f us (default tiles %s us, "
                 "cuBLAS %.1f us: dense steps run %s)", "x".join(map(str, r["shape"])), r["rows"], t.block_n,
                 t.block_k, t.num_warps, t.num_stages, r["ms"] * 1e3,
                 "-" if r["default_ms"] is None else f"{r['default_ms'] * 1e3:.1f}", r["cublas_ms"] * 1e3,
                 "cuBLAS" if r["cublas_ms"] <= r["ms"] else "the masked kernel")
    log.info("masked linear tiles tuned for %d products in %.1f s", sum(r["measured"] for r in reports),
             time.perf_counter() - t0)
    return reports
