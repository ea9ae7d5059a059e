"""The FFN-skip decision of one layer for every row of a decode step, on the device (no host
sync), with the rule of engine/skip/ffn_skipllm.py or, given a quorum, of engine/skip/batch_aligned.py.
Both read cos(h, out) of the previous layer per row (pre- vs post-FFN residual, fp32). A row
with skips left may fire when its cosine exceeds its threshold; a row that fires skips its next
`max_skips` FFNs. Each writes the layer's skip flags and run mask.

- `decide_rows` (per-row rule): one program per row computes its cosine and decides; one launch.
- `row_cosine` then `decide_aligned` (batch-aligned rule): the rows with a budget fire together
  when enough of them would (votes * 1000 >= quorum_per_mille * budgeted rows), so the decision
  is one program over all rows, after every row's cosine.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

COSINE_BLOCK = 1024


@triton.jit
def _cosine(a_ptr, b_ptr, row, stride_a, stride_b, hidden, eps_sq, BLOCK: tl.constexpr):
    """cos(a[row], b[row]) in fp32 (F.cosine_similarity's formula)."""
    dot = tl.zeros((BLOCK,), tl.float32)
    norm_a = tl.zeros((BLOCK,), tl.float32)
    norm_b = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < hidden
        a = tl.load(a_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
        dot += a * b
        norm_a += a * a
        norm_b += b * b
    denom = tl.sqrt(tl.maximum(tl.sum(norm_a, axis=0), eps_sq) * tl.maximum(tl.sum(norm_b, axis=0), eps_sq))
    return tl.sum(dot, axis=0) / denom


@triton.jit
def _apply(r, rmask, fire, max_skips, fired, remaining, fired_ptr, remaining_ptr, skipped_ptr, run_ptr):
    """Rows that fire skip their next max_skips FFNs, this layer's included. A padded row
    (max_skips < 0, graphs.PAD_MAX_SKIPS) runs no FFN and counts no skip."""
    remaining = tl.where(fire, max_skips, remaining)
    skip = remaining > 0
    remaining -= skip.to(tl.int32)
    tl.store(fired_ptr + r, tl.where(fire, 1, fired), mask=rmask)
    tl.store(remaining_ptr + r, remaining, mask=rmask)
    tl.store(skipped_ptr + r, skip.to(tl.int32), mask=rmask)
    tl.store(run_ptr + r, ((skip == 0) & (max_skips >= 0)).to(tl.int32), mask=rmask)


@triton.jit
def _cosine_kernel(a_ptr, b_ptr, cos_ptr, stride_a, stride_b, hidden, eps_sq, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tl.store(cos_ptr + row, _cosine(a_ptr, b_ptr, row, stride_a, stride_b, hidden, eps_sq, BLOCK))


@triton.jit
def _decide_rows_kernel(a_ptr, b_ptr, max_skips_ptr, threshold_ptr, fired_ptr, remaining_ptr, skipped_ptr, run_ptr,
                        stride_a, stride_b, hidden, eps_sq, HAS_COS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    r = row + tl.arange(0, 1)
    rmask = r >= 0
    cos = -2.0  # no layer before the first hot one (cold_start 0): nothing fires (engine/skip/base.NO_COSINE)
    if HAS_COS:
        cos = _cosine(a_ptr, b_ptr, row, stride_a, stride_b, hidden, eps_sq, BLOCK)
    max_skips = tl.load(max_skips_ptr + r)
    fired = tl.load(fired_ptr + r)
    fire = (max_skips > 0) & (cos > tl.load(threshold_ptr + r)) & (fired == 0)
    _apply(r, rmask, fire, max_skips, fired, tl.load(remaining_ptr + r), fired_ptr, remaining_ptr, skipped_ptr, run_ptr)


@triton.jit
def _decide_aligned_kernel(cos_ptr, max_skips_ptr, threshold_ptr, fired_ptr, remaining_ptr, skipped_ptr, run_ptr,
                           rows, quorum_per_mille, HAS_COS: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    rmask = r < rows
    cos = tl.full((BLOCK_R,), -2.0, tl.float32)  # no layer before the first hot one: nothing fires (base.NO_COSINE)
    if HAS_COS:
        cos = tl.load(cos_ptr + r, mask=rmask, other=0.0)
    max_skips = tl.load(max_skips_ptr + r, mask=rmask, other=0)
    threshold = tl.load(threshold_ptr + r, mask=rmask, other=0.0)
    fired = tl.load(fired_ptr + r, mask=rmask, other=0)
    budgeted = (max_skips > 0) & rmask
    votes = tl.sum((budgeted & (cos > threshold)).to(tl.int32), axis=0)
    voters = tl.sum(budgeted.to(tl.int32), axis=0)
    group_free = tl.max(fired, axis=0) == 0  # the batch fires once per token
    fire = budgeted & group_free & (voters > 0) & (votes * 1000 >= quorum_per_mille * voters)
    _apply(r, rmask, fire, max_skips, fired, tl.load(remaining_ptr + r, mask=rmask, other=0),
           fired_ptr, remaining_ptr, skipped_ptr, run_ptr)


def row_cosine(h: torch.Tensor, out: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """h, out: [rows, hidden] -> cos per row [rows] fp32 (F.cosine_similarity's formula)."""
    rows, hidden = h.shape
    cos = torch.empty(rows, device=h.device, dtype=torch.float32)
    _cosine_kernel[(rows,)](h, out, cos, h.stride(0), out.stride(0), hidden, eps * eps, BLOCK=COSINE_BLOCK)
    return cos


def decide_rows(prev: tuple[torch.Tensor, torch.Tensor] | None, max_skips: torch.Tensor, threshold: torch.Tensor,
                fired: torch.Tensor, remaining: torch.Tensor, skipped: torch.Tensor, run: torch.Tensor,
                eps: float = 1e-8) -> None:
    """The per-row rule for one layer: updates `fired`, `remaining` and writes `skipped`, `run`
    (int32 [rows]). prev: (h, out) [rows, hidden] of the previous layer, or None (no earlier
    layer: cos 0); max_skips int32, threshold fp32 [rows]."""
    rows = max_skips.shape[0]
    a, b = prev if prev is not None else (threshold, threshold)
    _decide_rows_kernel[(rows,)](
        a, b, max_skips, threshold, fired, remaining, skipped, run,
        a.stride(0), b.stride(0), a.shape[-1], eps * eps, HAS_COS=prev is not None, BLOCK=COSINE_BLOCK,
    )


def decide_aligned(cos: torch.Tensor | None, max_skips: torch.Tensor, threshold: torch.Tensor, fired: torch.Tensor,
                   remaining: torch.Tensor, skipped: torch.Tensor, run: torch.Tensor, quorum_per_mille: int) -> None:
    """The batch-aligned rule for one layer (quorum in 1/1000): updates `fired`, `remaining` and
    writes `skipped`, `run` (int32 [rows]). cos: [rows] (row_cosine) or None (no earlier layer)."""
    rows = max_skips.shape[0]
    _decide_aligned_kernel[(1,)](
        max_skips if cos is None else cos, max_skips, threshold, fired, remaining, skipped, run,
        rows, quorum_per_mille, HAS_COS=cos is not None, BLOCK_R=triton.next_power_of_2(rows),
    )
