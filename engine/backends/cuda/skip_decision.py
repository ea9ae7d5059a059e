"""The FFN-skip decision of one layer for every row of a decode step, on the device (two small
kernels, no host sync), with the rule of engine/skip/ffn_skipllm.py or, given a quorum, of
engine/skip/batch_aligned.py.

- `row_cosine`: cos(h, out) of the previous layer per row (pre- vs post-FFN residual), fp32.
- `decide`: one program over all rows. A row with skips left may fire when its cosine exceeds
  its threshold: per row (each row on its own), or batch-aligned (all rows with a budget fire
  together when enough of them would: votes * 1000 >= quorum_per_mille * budgeted rows). A row
  that fires skips its next `max_skips` FFNs. Writes this layer's skip flags and run mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

COSINE_BLOCK = 1024


@triton.jit
def _cosine_kernel(a_ptr, b_ptr, cos_ptr, stride_a, stride_b, hidden, eps_sq, BLOCK: tl.constexpr):
    row = tl.program_id(0)
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
    tl.store(cos_ptr + row, tl.sum(dot, axis=0) / denom)


@triton.jit
def _decide_kernel(cos_ptr, max_skips_ptr, threshold_ptr, fired_ptr, remaining_ptr, skipped_ptr, run_ptr,
                   rows, quorum_per_mille,
                   HAS_COS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    rmask = r < rows
    cos = tl.zeros((BLOCK_R,), tl.float32)  # no layer before the first hot one: cos 0, as the reference
    if HAS_COS:
        cos = tl.load(cos_ptr + r, mask=rmask, other=0.0)
    max_skips = tl.load(max_skips_ptr + r, mask=rmask, other=0)
    threshold = tl.load(threshold_ptr + r, mask=rmask, other=0.0)
    fired = tl.load(fired_ptr + r, mask=rmask, other=0)
    remaining = tl.load(remaining_ptr + r, mask=rmask, other=0)
    budgeted = (max_skips > 0) & rmask
    wants = budgeted & (cos > threshold)
    if ALIGNED:
        votes = tl.sum(wants.to(tl.int32), axis=0)
        voters = tl.sum(budgeted.to(tl.int32), axis=0)
        group_free = tl.max(fired, axis=0) == 0  # the batch fires once per token
        fire_all = group_free & (voters > 0) & (votes * 1000 >= quorum_per_mille * voters)
        fire = budgeted & fire_all
    else:
        fire = wants & (fired == 0)
    remaining = tl.where(fire, max_skips, remaining)
    skip = remaining > 0
    remaining -= skip.to(tl.int32)
    tl.store(fired_ptr + r, tl.where(fire, 1, fired), mask=rmask)
    tl.store(remaining_ptr + r, remaining, mask=rmask)
    tl.store(skipped_ptr + r, skip.to(tl.int32), mask=rmask)
    tl.store(run_ptr + r, (skip == 0).to(tl.int32), mask=rmask)


def row_cosine(h: torch.Tensor, out: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """h, out: [rows, hidden] -> cos per row [rows] fp32 (F.cosine_similarity's formula)."""
    rows, hidden = h.shape
    cos = torch.empty(rows, device=h.device, dtype=torch.float32)
    _cosine_kernel[(rows,)](h, out, cos, h.stride(0), out.stride(0), hidden, eps * eps, BLOCK=COSINE_BLOCK)
    return cos


def decide(cos: torch.Tensor | None, max_skips: torch.Tensor, threshold: torch.Tensor, fired: torch.Tensor,
           remaining: torch.Tensor, skipped: torch.Tensor, run: torch.Tensor,
           quorum_per_mille: int | None = None) -> None:
    """Updates `fired`, `remaining` (int32 [rows]) and writes `skipped`, `run` (int32 [rows]) for
    one layer. cos: [rows] or None (no earlier layer); max_skips int32, threshold fp32 [rows];
    quorum_per_mille: None = per-row rule, else the batch-aligned rule's quorum in 1/1000."""
    rows = max_skips.shape[0]
    _decide_kernel[(1,)](
        max_skips if cos is None else cos, max_skips, threshold, fired, remaining, skipped, run,
        rows, quorum_per_mille or 0,
        HAS_COS=cos is not None, ALIGNED=quorum_per_mille is not None, BLOCK_R=triton.next_power_of_2(rows),
    )
