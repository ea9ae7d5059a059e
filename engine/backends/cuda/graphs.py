"""CUDA graphs for decode steps: one graph per batch-size bucket, captured once at start.

A decode step of a 7B model launches hundreds of small kernels; replaying them as a graph removes
the launch overhead that dominates batch-1 decode. Graphs replay fixed addresses, so every input
of a step lives in static buffers sized for the largest bucket (`StaticDecodeBuffers`); a step of
n rows fills the first n rows, pads up to its bucket, and replays that bucket's graph.

Padded rows are harmless: token 0 at position 0, context length 0 (attention writes zeros), write
slot -1 (no K/V written into a block that a real row owns), max_skips 0 (never skip, never
counted). Buckets (as nano-vllm): 1, 2, 4, 8, then steps of 16 up to the largest batch. Prefill
and any step without a captured bucket run eagerly on the same buffers; a capture that fails
logs a warning and leaves every step eager (as does never calling `capture`, e.g. with
--enforce-eager).

The step itself is the caller's `forward(batch: DecodeBatch) -> Tensor`: it must read its inputs
only from `batch` (and the skip gate bound to `buffers.max_skips` / `buffers.thresholds`), and must
not synchronize with the host (no .item(), .tolist(), host-sized allocations from device values).
Its returned tensor is overwritten by the next step: consume it (lm_head, sampling) first.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("skipserve.cuda_graphs")

PAD_SLOT = -1  # write_kv writes nothing for a slot < 0


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16, up to and including `max_batch`."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_batch} | set(range(16, max_batch + 1, 16)) | {max_batch}
    return sorted(sizes)


def bucket_for(rows: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `rows` rows, or None when none does."""
    return next((b for b in buckets if b >= rows), None)


@dataclass
class DecodeInputs:
    """One decode step, host side: a token per row."""

    token_ids: list[int]
    positions: list[int]  # where each token goes (its context length is position + 1)
    block_tables: list[list[int]]
    max_skips: list[int]  # FFNs each row may skip this step (0 = dense)
    thresholds: list[float]


@dataclass
class DecodeBatch:
    """The device tensors a decode step reads (the first `rows` rows of the static buffers)."""

    token_ids: torch.Tensor  # [rows] int64
    positions: torch.Tensor  # [rows] int64
    block_tables: torch.Tensor  # [rows, max_blocks] int32
    context_lens: torch.Tensor  # [rows] int32 (0 = padded row)
    slots: torch.Tensor  # [rows] int64, block * block_size + offset of the new K/V (-1 = padded row)
    max_skips: torch.Tensor  # [rows] int32
    thresholds: torch.Tensor  # [rows] fp32


def padded_inputs(inputs: DecodeInputs, rows: int, max_blocks: int, block_size: int) -> DecodeBatch:
    """The step's inputs as CPU tensors of `rows` rows (the real ones first, then padding)."""
    n = len(inputs.token_ids)
    assert n <= rows, f"{n} rows do not fit a bucket of {rows}"
    tables = torch.zeros(rows, max_blocks, dtype=torch.int32)
    for i, table in enumerate(inputs.block_tables):
        assert len(table) <= max_blocks, f"row {i} has {len(table)} blocks, the buffers hold {max_blocks}"
        tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
    pad = rows - n
    slots = [t[p // block_size] * block_size + p % block_size for t, p in zip(inputs.block_tables, inputs.positions)]
    return DecodeBatch(
        token_ids=torch.tensor(inputs.token_ids + [0] * pad, dtype=torch.int64),
        positions=torch.tensor(inputs.positions + [0] * pad, dtype=torch.int64),
        block_tables=tables,
        context_lens=torch.tensor([p + 1 for p in inputs.positions] + [0] * pad, dtype=torch.int32),
        slots=torch.tensor(slots + [PAD_SLOT] * pad, dtype=torch.int64),
        max_skips=torch.tensor(inputs.max_skips + [0] * pad, dtype=torch.int32),
        thresholds=torch.tensor(inputs.thresholds + [float("inf")] * pad, dtype=torch.float32),
    )


class StaticDecodeBuffers:
    """Every input of a decode step, allocated once for `max_batch` rows; a step of B rows (or a
    bucket of B) uses views of the first B rows, whose addresses never change."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, device):
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        empty = padded_inputs(DecodeInputs([], [], [], [], []), max_batch, max_blocks, block_size)
        self.full = DecodeBatch(**{name: t.to(device) for name, t in vars(empty).items()})
        self.max_skips, self.thresholds = self.full.max_skips, self.full.thresholds  # the skip gate's inputs

    def view(self, rows: int) -> DecodeBatch:
        return DecodeBatch(**{name: t[:rows] for name, t in vars(self.full).items()})

    def fill(self, inputs: DecodeInputs, rows: int) -> DecodeBatch:
        """Copies a step into the first `rows` rows (padding the rest of them) -> their views."""
        batch = self.view(rows)
        for name, host in vars(padded_inputs(inputs, rows, self.max_blocks, self.block_size)).items():
            getattr(batch, name).copy_(host, non_blocking=True)
        return batch


class DecodeGraphs:
    def __init__(self, forward: Callable[[DecodeBatch], torch.Tensor], buffers: StaticDecodeBuffers,
                 buckets: list[int] | None = None):
        self.forward, self.buffers = forward, buffers
        self.buckets = buckets or batch_buckets(buffers.max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def capture(self, warmup_steps: int = 2) -> bool:
        """Captures every bucket, largest first so the smaller ones reuse its memory pool. On
        failure: a warning, no graphs, every step eager. -> whether graphs are in use."""
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.current_stream()
        # one warm-up stream for every bucket: cuBLAS keeps a workspace (32 MiB on Hopper) per stream it ran on
        side = torch.cuda.Stream()
        try:
            for rows in sorted(self.buckets, reverse=True):
                self.buffers.fill(DecodeInputs([], [], [], [], []), rows)  # all rows padded: nothing is written
                batch = self.buffers.view(rows)
                side.wait_stream(stream)
                with torch.cuda.stream(side):  # compiles the kernels and sets up libraries outside the capture
                    for _ in range(warmup_steps):
                        self.forward(batch)
                stream.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[rows] = self.forward(batch)
                self.graphs[rows] = graph
            torch.cuda.synchronize()
        except Exception as exc:  # any failure leaves a correct eager engine, never a broken one
            torch.cuda.set_stream(stream)  # a capture that fails as it ends leaves its capture stream current
            log.warning("CUDA graph capture failed, decode runs eagerly: %r", exc)
            self.graphs, self.outputs = {}, {}
            return False
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s, %.0f MiB", len(self.graphs),
                 ",".join(map(str, sorted(self.graphs))), time.perf_counter() - t0,
                 (free_before - torch.cuda.mem_get_info()[0]) / 2**20)
        return True

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """One decode step -> the forward's output for the real rows (graph replay when a bucket
        holds them, else eager on the same buffers)."""
        rows = len(inputs.token_ids)
        bucket = bucket_for(rows, sorted(self.graphs))
        if bucket is None:
            return self.forward(self.buffers.fill(inputs, rows))
        self.buffers.fill(inputs, bucket)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:rows]
