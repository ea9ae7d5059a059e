"""A `QuantWeight` rearranged into the tiles the CPU kernel reads (engine/native/quant_linear.cpp).

Tiles of 16 outputs x one group of inputs, ordered [output tile][group] (outputs padded to a
multiple of 16 with zero rows). Within a tile the integers are laid out as vectors of 32-bit lanes,
lane j holding two consecutive weights of output j as the kernel widens them to int16 pairs:
- 4 bits, groups of 32: 8 chunks of 32 bytes; byte 2j + e of chunk c holds weight 4c + e (low
  nibble) and weight 4c + 2 + e (high nibble) of output j;
- 8 bits, groups of 32 or 16: G / 2 chunks of 32 bytes; byte 2j + e of chunk c is weight 2c + e.
Scales and offsets follow as [output tile][group][16], in fp16 where every one of them is an fp16
value (Q4_0, Q4_1 and Q8_0 store fp16 scales: 2 bytes a group less to read per token), fp32
otherwise (K-quants multiply an fp16 scale by an integer). The same integers, scales and offsets
as the `QuantWeight`: moved, not rounded (`integers` undoes the tiling, tests check both ways).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.quant.weight import QuantWeight, looked_up, scaled

TILE = 16  # outputs a tile


@dataclass(frozen=True)
class TiledWeight:
    q: torch.Tensor  # uint8 [tiles, groups, TILE * group * bits / 8]
    scale: torch.Tensor  # fp16 or fp32 [tiles, groups, TILE]
    offset: torch.Tensor | None  # as scale, or None
    out_features: int
    bits: int
    group: int
    source: str
    table: torch.Tensor | None = None  # int8 [16] that 4-bit q index (QuantWeight.table)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.scale.shape[1] * self.group

    @property
    def scale_bits(self) -> int:
        return self.scale.element_size() * 8

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.offset) if t is not None)

    @staticmethod
    def from_weight(weight: QuantWeight | list[QuantWeight]) -> "TiledWeight":
        """One QuantWeight, or the row blocks of one fused projection (one layout and width: a gate|up)
        tiled each into its place, with no stacked copy first where every block but the last fills
        whole tiles (else the rows are stacked first)."""
        parts = weight if isinstance(weight, list) else [weight]
        if any(p.shape[0] % TILE for p in parts[:-1]):
            parts = [QuantWeight.cat(parts)]
        first = parts[0]
        assert all(p.layout == first.layout and p.shape[1] == first.shape[1] for p in parts)
        tiles = [-(-p.shape[0] // TILE) for p in parts]
        narrowed = _narrowest([p.scale for p in parts] + [p.offset for p in parts])  # fp16 for all or none
        scales, offsets = narrowed[:len(parts)], narrowed[len(parts):]
        q = _tiled_integers(parts, tiles)
        return TiledWeight(q=q, scale=torch.cat([_tile_groups(s, n * TILE - p.shape[0], n)
                                                 for s, p, n in zip(scales, parts, tiles)]),
                           offset=None if first.offset is None else torch.cat(
                               [_tile_groups(o, n * TILE - p.shape[0], n) for o, p, n in zip(offsets, parts, tiles)]),
                           out_features=sum(p.shape[0] for p in parts), bits=first.bits, group=first.group,
                           source="+".join(sorted({p.source for p in parts})),
                           table=None if first.table is None else first.table.to(torch.int8).contiguous())

    def integers(self, rows: torch.Tensor) -> torch.Tensor:
        """q of the selected rows as int32 [rows, groups, group] (the tiling undone)."""
        tiles, lanes = rows // TILE, rows % TILE
        q = self.q[tiles]  # [n, groups, bytes]
        n, groups, g = q.shape[0], q.shape[1], self.group
        if self.bits == 4:
            q = q.view(n, groups, g // 4, TILE, 2)[torch.arange(n), :, :, lanes].to(torch.int32)  # [n, groups, c, e]
            return looked_up(torch.stack([q & 0x0F, q >> 4], dim=-2).reshape(n, groups, g), self.table)  # 4c + 2h + e
        q = q.view(torch.int8).view(n, groups, g // 2, TILE, 2)[torch.arange(n), :, :, lanes]
        return q.reshape(n, groups, g).to(torch.int32)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [rows, in] of the selected rows (all by default)."""
        rows = torch.arange(self.out_features) if rows is None else rows
        tiles, lanes = rows // TILE, rows % TILE
        return scaled(self.integers(rows), self.scale[tiles, :, lanes].float(),
                      None if self.offset is None else self.offset[tiles, :, lanes].float())

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: the dequantized fp32 rows `ids` (as `tensor[ids]` on a dense matrix)."""
        return self.dequantize(ids.reshape(-1)).view(*ids.shape, self.shape[1])


def _tiled_integers(parts: list[QuantWeight], tiles: list[int]) -> torch.Tensor:
    """The integers of row blocks `parts` tiled, each block (of `tiles[i]` tiles) from a whole tile on:
    uint8 [sum(tiles), groups, TILE * G * bits / 8] (the module's layout), in one pass a block of the
    native library's where it is loaded, else in torch."""
    from engine.native.build import kernels

    lib, first = kernels(), parts[0]
    group = 32 if first.bits == 4 else first.group  # 4-bit integers come in groups of 32, 16 bytes each
    groups = first.shape[1] // group
    dst = torch.empty(sum(tiles), groups, TILE * group * first.bits // 8, dtype=torch.uint8)
    at = 0
    for weight, n in zip(parts, tiles):
        out = weight.shape[0]
        if lib is not None:
            src = weight.q.contiguous()
            lib.quant_tile_integers(src.data_ptr(), dst[at].data_ptr(), out, groups, group, weight.bits,
                                    torch.get_num_threads())
        else:
            dst[at:at + n] = _torch_tiled_integers(weight, n)
        at += n
    return dst


def _torch_tiled_integers(weight: QuantWeight, tiles: int) -> torch.Tensor:
    out = weight.shape[0]
    q = _pad_rows(_weight_bytes(weight), tiles * TILE - out)  # uint8 [out, groups, G], a byte a weight
    groups, g = q.shape[1], q.shape[2]
    q = q.view(tiles, TILE, groups, g).transpose(1, 2)  # [tiles, groups, TILE, G]
    if weight.bits == 4:  # weight 4c + 2h + e -> chunk c, nibble h, byte 2j + e
        q = q.reshape(tiles, groups, TILE, g // 4, 2, 2)
        packed = (q[..., 0, :] | (q[..., 1, :] << 4)).permute(0, 1, 3, 2, 4)  # [tiles, groups, c, TILE, e]
    else:  # weight 2c + e -> chunk c, byte 2j + e
        packed = q.reshape(tiles, groups, TILE, g // 2, 2).permute(0, 1, 3, 2, 4)
    return packed.reshape(tiles, groups, -1)


def _narrowest(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """fp32 tensors as fp16 when all of them survive the round trip exactly, else unchanged."""
    halves = [None if t is None else t.half() for t in tensors]
    if all(t is None or torch.equal(h.float(), t) for t, h in zip(tensors, halves)):
        return halves
    return tensors


def _weight_bytes(weight: QuantWeight) -> torch.Tensor:
    """The integers of a QuantWeight as uint8 [out, groups, group], one byte a weight (4-bit ones
    unpacked; 8-bit ones as their int8 bits): a quarter of what int32 integers take, for the
    embedding of a large vocabulary hundreds of MB less at load."""
    out = weight.q.shape[0]
    if weight.bits == 4:
        q = weight.q.view(out, -1, 16)
        return torch.cat([q & 0x0F, q >> 4], dim=-1)
    return weight.q.view(out, -1, weight.group)


def _pad_rows(t: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def _tile_groups(t: torch.Tensor, pad: int, tiles: int) -> torch.Tensor:
    """[out, groups] -> [tiles, groups, TILE]."""
    t = _pad_rows(t, pad)
    return t.view(tiles, TILE, t.shape[1]).transpose(1, 2).contiguous()
