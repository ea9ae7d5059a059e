"""A weight matrix in the quantized layout the CPU kernels read (engine/native/quant_linear.cpp).

Row-major over outputs; each row is `in / group` groups of `group` inputs held as `bits`-bit
integers q with one fp32 scale d and, for formats with one, one fp32 offset m per group:
w = d * q + m.
- 4 bits, groups of 32: 16 bytes a group, byte j = q_j | q_{j+16} << 4 (q in 0..15), the order of
  GGUF's Q4_0 / Q4_1 blocks; with a `table` (16 signed bytes: IQ4's or MXFP4's values) q indexes it, and
  the weight is w = d * table[q] (such formats have no offset);
- 8 bits, groups of 32 or 16: one signed byte a weight.
Every GGUF format in `engine/quant/formats.py` maps onto one of these without loss: its integers
fit the width and its scales and offsets are exact in fp32 (fp16 values, or an fp16 value times a
6- or 8-bit integer). The kernel's tiles (engine/quant/tiled.py) keep them in fp16 where all are.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


def scaled(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """w = d * q + m: int32 q [rows, groups, group], d and m [rows, groups] -> fp32 [rows, in]."""
    w = q.float() * scale.unsqueeze(-1)
    if offset is not None:
        w = w + offset.unsqueeze(-1)
    return w.flatten(1)


def looked_up(q: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """4-bit q as int32 integers: themselves, or the table's entries they index."""
    return q.to(torch.int32) if table is None else table.to(torch.int32)[q.long()]


@dataclass(frozen=True)
class QuantWeight:
    q: torch.Tensor  # uint8 [out, in * bits / 8]
    scale: torch.Tensor  # fp32 [out, in / group]
    offset: torch.Tensor | None  # fp32 [out, in / group], or None (w = d * q)
    bits: int  # 4 or 8
    group: int  # 32 (or 16 with 8 bits)
    source: str  # the format it came from, e.g. "Q4_1" (for logs)
    table: torch.Tensor | None = None  # int8 [16] that 4-bit q index (IQ4, MXFP4), or None: q is the integer

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.scale.shape[1] * self.group

    @property
    def layout(self) -> tuple:
        """Weights with the same layout can share one kernel call (rows concatenated)."""
        return self.bits, self.group, self.offset is not None, None if self.table is None else tuple(self.table.tolist())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.offset) if t is not None)

    def integers(self, rows=slice(None)) -> torch.Tensor:
        """q of the selected rows as int32 [rows, groups, group]."""
        q = self.q[rows]
        if self.bits == 4:
            q = q.view(q.shape[0], -1, 16)
            return looked_up(torch.cat([q & 0x0F, q >> 4], dim=-1), self.table)
        return q.view(torch.int8).view(q.shape[0], -1, self.group).to(torch.int32)

    def dequantize(self, rows=slice(None)) -> torch.Tensor:
        """fp32 [rows, in] of the selected rows (all by default)."""
        return scaled(self.integers(rows), self.scale[rows], None if self.offset is None else self.offset[rows])

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: the dequantized fp32 rows `ids` (as `tensor[ids]` on a dense matrix)."""
        flat = ids.reshape(-1)
        return self.dequantize(flat).view(*ids.shape, self.shape[1])

    def permute_rows(self, order: torch.Tensor) -> "QuantWeight":
        """Row i of the result is row order[i] of this one (rows are independent: no loss)."""
        return replace(self, q=self.q[order].contiguous(), scale=self.scale[order].contiguous(),
                       offset=None if self.offset is None else self.offset[order].contiguous())

    @staticmethod
    def cat(parts: list["QuantWeight"]) -> "QuantWeight":
        """Rows of `parts` stacked (all of one layout and width)."""
        first = parts[0]
        assert all(p.layout == first.layout and p.shape[1] == first.shape[1] for p in parts)
        offset = None if first.offset is None else torch.cat([p.offset for p in parts])
        sources = "+".join(sorted({p.source for p in parts}))
        return replace(first, q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale for p in parts]),
                       offset=offset, source=sources)
