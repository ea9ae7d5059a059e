"""Per-step attention metadata: where each token of a forward pass sits in the paged KV cache.

The runner builds one per forward from the sequences' block tables (lists of ints); the model
hands it to the backend's attention. Decode rows carry their block tables as one padded int32
tensor [rows, max blocks] (padding repeats block 0: kernels never read past a row's length) and
their context lengths, the new token included.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.rows import device_values


@dataclass
class PrefillSegment:
    """`num_tokens` new tokens of one sequence at positions start.. (keys: positions 0..end)."""

    start: int
    num_tokens: int
    block_table: torch.Tensor  # [blocks covering start + num_tokens] int64
    positions: torch.Tensor  # [num_tokens]

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [N] absolute position of each new token
    is_prefill: bool
    block_size: int
    write_blocks: torch.Tensor  # [N] block that receives each new token's K/V
    write_offsets: torch.Tensor  # [N] its offset in that block
    segments: list[PrefillSegment] = field(default_factory=list)  # prefill: one per sequence, in order
    block_tables: torch.Tensor | None = None  # decode: [B, max blocks] int32
    context_lens: torch.Tensor | None = None  # decode: [B] int32, the new token included
    max_context_len: int = 0
    dtype: torch.dtype = torch.float32
    _masks: dict = field(default_factory=dict)  # (segment, window) -> mask, built once per step
    _rows: tuple | None = None  # prefill as rows: tables, lengths and the longest, built once per step

    @classmethod
    def for_prefill(cls, chunks: list[tuple[list[int], int, int]], block_size: int,
                    device) -> "AttentionMetadata":
        """Prefill chunks (block table, start, num_tokens) of several sequences in one forward: the
        projections and FFNs run on all their tokens at once, attention per sequence."""
        device = torch.device(device)
        segments, blocks, offsets = [], [], []
        for table, start, n in chunks:
            positions = list(range(start, start + n))
            used = -(-(start + n) // block_size)
            segments.append(PrefillSegment(start, n, device_values(table[:used], device),
                                           device_values(positions, device)))
            blocks += [table[p // block_size] for p in positions]
            offsets += [p % block_size for p in positions]
        return cls(positions=torch.cat([s.positions for s in segments]), is_prefill=True, block_size=block_size,
                   write_blocks=device_values(blocks, device), write_offsets=device_values(offsets, device),
                   segments=segments)

    @classmethod
    def for_decode(cls, block_tables: list[list[int]], positions: list[int], block_size: int, device,
                   dtype) -> "AttentionMetadata":
        """One new token per row at `positions` (its K/V goes there), attending to 0..position."""
        device = torch.device(device)  # (each list to a GPU through pinned memory, without waiting)
        width = max(-(-(p + 1) // block_size) for p in positions)
        padded = [table[:width] + [0] * (width - min(len(table), width)) for table in block_tables]
        return cls(
            positions=device_values(positions, device),
            is_prefill=False,
            block_size=block_size,
            write_blocks=device_values([t[p // block_size] for t, p in zip(block_tables, positions)], device),
            write_offsets=device_values([p % block_size for p in positions], device),
            block_tables=device_values(padded, device, torch.int32),
            context_lens=device_values([p + 1 for p in positions], device, torch.int32),
            max_context_len=max(positions) + 1,
            dtype=dtype,
        )

    def prefill_rows(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The prefill tokens (of all segments, in order) as decode rows: [N, max blocks] int32 block
        tables (each token's sequence's, padded with block 0), [N] int32 context lengths
        (position + 1) and the longest, built once per step; a backend whose decode attention takes
        the rows computes a prompt's attention as token-by-token decoding would."""
        if self._rows is None:
            width = max(len(seg.block_table) for seg in self.segments)
            tables = torch.zeros(len(self.positions), width, dtype=torch.int32, device=self.positions.device)
            row = 0
            for seg in self.segments:
                tables[row:row + seg.num_tokens, :len(seg.block_table)] = seg.block_table.to(torch.int32)
                row += seg.num_tokens
            lengths = self.positions.to(torch.int32) + 1
            self._rows = tables, lengths, int(lengths.max())
        return self._rows

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """[N, end] bool (True = attend) for segment `index`; `window`: only the last `window`
        positions (sliding-window layers)."""
        key = (index, window)
        if key not in self._masks:
            seg = self.segments[index]
            keys = torch.arange(seg.end, device=seg.positions.device)
            distance = seg.positions[:, None] - keys[None, :]
            allowed = distance >= 0
            self._masks[key] = allowed & (distance < window) if window else allowed
        return self._masks[key]

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, max blocks * block_size] additive (0 / -inf) over each row's gathered keys."""
        key = ("decode", window)
        if key not in self._masks:
            span = self.block_tables.shape[1] * self.block_size
            keys = torch.arange(span, device=self.context_lens.device)[None, :]
            lengths = self.context_lens[:, None].long()
            blocked = keys >= lengths
            if window:
                blocked |= keys < lengths - window
            mask = torch.zeros(blocked.shape, dtype=self.dtype, device=blocked.device)
            self._masks[key] = mask.masked_fill_(blocked, float("-inf"))[:, None, None, :]
        return self._masks[key]
