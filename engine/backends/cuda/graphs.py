"""CUDA graphs for decode steps: one graph per batch-size bucket, captured once at start.

A decode step of a 7B model launches hundreds of small kernels; replaying them as a graph removes
the launch overhead that dominates batch-1 decode. Graphs replay fixed addresses, so every input
of a step lives in static buffers sized for the largest bucket (`StaticDecodeBuffers`); a step of
n rows fills the first n rows, pads up to its bucket, and replays that bucket's graph. The buffers
go to the device in one copy a step.

Padded rows are harmless: token 0 at position 0, context length 0 (attention writes zeros), write
slot -1 (no K/V written into a block that a real row owns), max_skips -1 (never skip, never
counted, and never run a hot layer's FFN, so it keeps no weight read that the real rows skip).
Buckets (as nano-vllm): 1, 2, 4, 8, then steps of 16 up to the largest batch. Prefill
and any step without a captured bucket run eagerly on the same buffers; a capture that fails
logs a warning and leaves every step eager (as does never calling `capture`, e.g. with
--enforce-eager).

The step itself is the caller's, one `forward(batch: DecodeBatch) -> Tensor` per variant (the
Llama step has a dense one and one with the skip gate): it must read its inputs only from `batch`
(and the skip gate bound to `buffers.max_skips` / `buffers.thresholds`), and must not synchronize
with the host (no .item(), .tolist(), host-sized allocations from device values). Its returned
tensor is overwritten by the next step: consume it (lm_head, sampling) first.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("skipserve.cuda_graphs")

PAD_SLOT = -1  # write_kv writes nothing for a slot < 0
# a padded row's max_skips: it never fires, and never runs a hot layer's FFN (engine/backends/cuda/
# skip_decision.py), so a layer that every real row skips reads none of its weights at any batch
# size, not only at the buckets' own sizes (a padded row that ran kept every weight read)
PAD_MAX_SKIPS = -1


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


_FIELDS = {  # DecodeBatch's fields: dtype, and whether a row holds max_blocks of them (last: a step
    # copies the buffer up to its own rows' tables, not every row's)
    "token_ids": (torch.int64, False), "positions": (torch.int64, False), "slots": (torch.int64, False),
    "context_lens": (torch.int32, False), "max_skips": (torch.int32, False), "thresholds": (torch.float32, False),
    "block_tables": (torch.int32, True),
}
_ALIGN = 256  # bytes: each field starts aligned in the packed buffers


class StaticDecodeBuffers:
    """Every input of a decode step, allocated once for `max_batch` rows; a step of B rows (or a
    bucket of B) uses views of the first B rows, whose addresses never change.

    The fields are typed views of one packed byte buffer on the device and its twin on the host
    (pinned where the device is CUDA): a step writes its rows on the host through numpy and goes
    over in one asynchronous copy (up to the end of its rows' block tables), not one small
    pageable copy per field. The host twin is not written again before that copy has finished
    (an event on the device's stream)."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, device):
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        device = torch.device(device)
        layout, size = {}, 0
        for name, (dtype, per_block) in _FIELDS.items():
            shape = (max_batch, max_blocks) if per_block else (max_batch,)
            nbytes = math.prod(shape) * dtype.itemsize
            layout[name], size = (size, nbytes, dtype, shape), size + -(-nbytes // _ALIGN) * _ALIGN
        self.host_bytes = torch.zeros(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.device_bytes = torch.zeros(size, dtype=torch.uint8, device=device)
        views = {name: (self.host_bytes[o:o + n].view(dt).view(shape), self.device_bytes[o:o + n].view(dt).view(shape))
                 for name, (o, n, dt, shape) in layout.items()}
        self.tables_offset = layout["block_tables"][0]
        self.staged = {name: host.numpy() for name, (host, _) in views.items()}  # numpy writes: no per-call torch cost
        self.full = DecodeBatch(**{name: dev for name, (_, dev) in views.items()})
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.fill(DecodeInputs([], [], [], [], []), max_batch)  # every row padded
        self.max_skips, self.thresholds = self.full.max_skips, self.full.thresholds  # the skip gate's inputs

    def view(self, rows: int) -> DecodeBatch:
        return DecodeBatch(**{name: t[:rows] for name, t in vars(self.full).items()})

    def fill(self, inputs: DecodeInputs, rows: int) -> DecodeBatch:
        """Writes a step into the first `rows` rows, the real ones first, then padding: token 0 at
        position 0, context 0, slot -1, max_skips -1 (never fires, never runs a hot FFN). -> the
        views of those rows."""
        n = len(inputs.token_ids)
        assert n <= rows <= self.max_batch, f"{n} rows do not fit a bucket of {rows}"
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has read the host twin
        st, bs = self.staged, self.block_size
        st["token_ids"][:n], st["token_ids"][n:rows] = inputs.token_ids, 0
        st["positions"][:n], st["positions"][n:rows] = inputs.positions, 0
        st["context_lens"][:n] = inputs.positions
        st["context_lens"][:n] += 1
        st["context_lens"][n:rows] = 0
        st["max_skips"][:n], st["max_skips"][n:rows] = inputs.max_skips, PAD_MAX_SKIPS
        st["thresholds"][:n], st["thresholds"][n:rows] = inputs.thresholds, float("inf")
        tables = st["block_tables"]
        tables[:rows] = 0
        for i, (table, pos) in enumerate(zip(inputs.block_tables, inputs.positions)):
            assert len(table) <= self.max_blocks, f"row {i} has {len(table)} blocks, the buffers hold {self.max_blocks}"
            tables[i, :len(table)] = table
            st["slots"][i] = table[pos // bs] * bs + pos % bs
        st["slots"][n:rows] = PAD_SLOT
        end = self.tables_offset + rows * self.max_blocks * tables.itemsize
        self.device_bytes[:end].copy_(self.host_bytes[:end], non_blocking=True)
        if self.copied is not None:
            self.copied.record(torch.cuda.current_stream(self.device_bytes.device))
        return self.view(rows)


class DecodeGraphs:
    """The graphs of one or more variants of a decode step (e.g. dense and gated), each captured per
    bucket into one memory pool: a step replays one variant's graph, never two at once."""

    def __init__(self, forwards: dict[str, Callable[[DecodeBatch], torch.Tensor]], buffers: StaticDecodeBuffers,
                 buckets: list[int] | None = None):
        self.forwards, self.buffers = forwards, buffers
        self.buckets = buckets or batch_buckets(buffers.max_batch)
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}

    def captured(self, variant: str) -> list[int]:
        """The buckets of `variant` that replay a graph."""
        return sorted(rows for v, rows in self.graphs if v == variant)

    def capture(self, warmup_steps: int = 2) -> bool:
        """Captures every variant's buckets, largest first so the smaller ones reuse the memory
        pool. On failure: a warning, no graphs, every step eager. -> whether graphs are in use."""
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.current_stream()
        # one warm-up stream for every graph: cuBLAS keeps a workspace (32 MiB on Hopper) per stream it ran on
        side = torch.cuda.Stream()
        try:
            for variant, forward in self.forwards.items():
                for rows in sorted(self.buckets, reverse=True):
                    batch = self.buffers.fill(DecodeInputs([], [], [], [], []), rows)  # all rows padded: nothing is written
                    side.wait_stream(stream)
                    with torch.cuda.stream(side):  # compiles (and tunes) the kernels, sets up libraries, outside the capture
                        for _ in range(warmup_steps):
                            forward(batch)
                    stream.wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self.outputs[variant, rows] = forward(batch)
                    self.graphs[variant, rows] = graph
            torch.cuda.synchronize()
        except Exception as exc:  # any failure leaves a correct eager engine, never a broken one
            torch.cuda.set_stream(stream)  # a capture that fails as it ends leaves its capture stream current
            log.warning("CUDA graph capture failed, decode runs eagerly: %r", exc)
            self.graphs, self.outputs = {}, {}
            return False
        log.info("captured %d decode CUDA graphs (%s) in %.1f s, %.0f MiB", len(self.graphs),
                 "; ".join(f"{v}: batch {','.join(map(str, self.captured(v)))}" for v in self.forwards),
                 time.perf_counter() - t0, (free_before - torch.cuda.mem_get_info()[0]) / 2**20)
        return True

    def run(self, inputs: DecodeInputs, variant: str) -> torch.Tensor:
        """One decode step of `variant` -> its forward's output for the real rows (graph replay when
        a bucket holds them, else eager on the same buffers)."""
        rows = len(inputs.token_ids)
        bucket = bucket_for(rows, self.captured(variant))
        if bucket is None:
            return self.forwards[variant](self.buffers.fill(inputs, rows))
        self.buffers.fill(inputs, bucket)
        self.graphs[variant, bucket].replay()
        return self.outputs[variant, bucket][:rows]
