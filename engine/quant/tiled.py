"""A `QuantWeight` rearranged into the tiles the CPU kernel reads (engine/native/quant_linear.cpp).

Tiles of 16 outputs x one group of inputs, ordered [output tile][group] (outputs padded to a
multiple of 16 with zero rows). Within a tile the integers are laid out as vectors of 32-bit lanes,
lane j holding two consecutive weights of output j as the kernel widens them to int16 pairs:
- 4 bits, groups of 32: 8 chunks of 32 bytes; byte 2j + e of chunk c holds weight 4c + e (low
  nibble) and weight 4c + 2 + e (high nibble) of output j;
- 8 bits, groups of 32 or 16: G / 2 chunks of 32 bytes; byte 2j + e of chunk c is weight 2c + e.
Scales and offsets follow as [output tile][group][16], in fp16 where every one of them is an fp16
value (Q4_0, Q4_1 and Q8_0 store fp16 scales: 2 bytes a group less to read per token), as their
two levels where the format has them over groups of 32 (`Levels`: Q4_K, Q5_K and IQ4_XS multiply
an fp16 value a 256 inputs by a small integer a group; `LEVELS_GROUP`), fp32 otherwise. Two levels
are one buffer a tile: the int8 [group][16], then the fp16 [256 inputs][16] (`scale_bits` 8): a
Q4_K weight reads 4.625 bits where fp32 scales made it 6. The same integers, scales and offsets as the
`QuantWeight`: moved, not rounded (`integers` undoes the tiling, tests check both ways).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.quant.weight import Levels, QuantWeight, looked_up, scaled

TILE = 16  # outputs a tile
# Two levels cost a group an int8 widening and a multiply more: over groups of 32 (Q4_K, Q5_K, IQ4_XS)
# that is free, over groups of 16 (Q6_K, Q2_K, Q3_K) it is not. On 2 threads of a Zen 4 EPYC (a
# 14336 x 4096 matrix, ad hoc) Q4_K read 0.86x the fp32 scales' time at 1 row and 1.01-1.03x at 4-16;
# Q6_K 1.01x at 1 row and 1.04-1.14x at 4-16, and a 4-row decode step of Llama-3-8B's shapes in
# Q4_K_M's formats was 0.95x as fast with them. So groups of 16 keep fp32 scales.
LEVELS_GROUP = 32


@dataclass(frozen=True)
class TiledWeight:
    q: torch.Tensor  # uint8 [tiles, groups, TILE * group * bits / 8]
    scale: torch.Tensor  # fp16 or fp32 [tiles, groups, TILE]; int8 with scale_super (a view of its buffer)
    offset: torch.Tensor | None  # as scale, or None
    out_features: int
    bits: int
    group: int
    source: str
    table: torch.Tensor | None = None  # int8 [16] that 4-bit q index (QuantWeight.table)
    scale_super: torch.Tensor | None = None  # fp16 [tiles, in / SUPER, TILE]: int8 scale's second level
    offset_super: torch.Tensor | None = None  # likewise for an int8 offset

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.scale.shape[1] * self.group

    @property
    def scale_bits(self) -> int:
        return self.scale.element_size() * 8

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.offset, self.scale_super,
                                                              self.offset_super) if t is not None)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each group's fp32 scale and offset (or None), [tiles, groups, TILE]."""
        return _expanded(self.scale, self.scale_super), _expanded(self.offset, self.offset_super)

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
        q = _tiled_integers(parts, tiles)
        common = dict(q=q, out_features=sum(p.shape[0] for p in parts), bits=first.bits, group=first.group,
                      source="+".join(sorted({p.source for p in parts})),
                      table=None if first.table is None else first.table.to(torch.int8).contiguous())
        if all(p.two_level for p in parts) and first.group == LEVELS_GROUP:
            scale, scale_super = _tile_levels([p.scale_levels for p in parts], parts, tiles)
            offset, offset_super = (None, None) if first.offset is None else \
                _tile_levels([p.offset_levels for p in parts], parts, tiles)
            return TiledWeight(scale=scale, offset=offset, scale_super=scale_super, offset_super=offset_super, **common)
        narrowed = _narrowest([p.scale for p in parts] + [p.offset for p in parts])  # fp16 for all or none
        scales, offsets = narrowed[:len(parts)], narrowed[len(parts):]
        return TiledWeight(scale=torch.cat([_tile_groups(s, n * TILE - p.shape[0], n)
                                            for s, p, n in zip(scales, parts, tiles)]),
                           offset=None if first.offset is None else torch.cat(
                               [_tile_groups(o, n * TILE - p.shape[0], n) for o, p, n in zip(offsets, parts, tiles)]),
                           **common)

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
        scale, offset = self.scales()
        return scaled(self.integers(rows), scale[tiles, :, lanes], None if offset is None else offset[tiles, :, lanes])

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


def _tile_levels(levels: list[Levels], parts: list[QuantWeight], tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row blocks' two-level scales (or offsets) -> one buffer a tile, the int8 [groups][TILE] then the
    fp16 [in / SUPER][TILE] (the kernel's layout for `scale_bits` 8), as views (ints, supers) of it."""
    pads = [n * TILE - p.shape[0] for p, n in zip(parts, tiles)]
    ints = torch.cat([_tile_groups(lv.ints, pad, n) for lv, pad, n in zip(levels, pads, tiles)])
    tops = torch.cat([_tile_groups(lv.super, pad, n) for lv, pad, n in zip(levels, pads, tiles)])
    count, groups, supers = ints.shape[0], ints.shape[1], tops.shape[1]
    buffer = torch.cat([ints.view(torch.uint8).reshape(count, -1), tops.view(torch.uint8).reshape(count, -1)], dim=1)
    return (buffer[:, :groups * TILE].view(torch.int8).view(count, groups, TILE),
            buffer[:, groups * TILE:].view(torch.float16).view(count, supers, TILE))


def _expanded(t: torch.Tensor | None, top: torch.Tensor | None) -> torch.Tensor | None:
    """Tiled scales or offsets as fp32 [tiles, groups, TILE], two levels multiplied out."""
    if t is None or top is None:
        return None if t is None else t.float()
    return t.float() * top.float().repeat_interleave(t.shape[1] // top.shape[1], dim=1)


def _tile_groups(t: torch.Tensor, pad: int, tiles: int) -> torch.Tensor:
    """[out, groups] -> [tiles, groups, TILE]."""
    t = _pad_rows(t, pad)
    return t.view(tiles, TILE, t.shape[1]).transpose(1, 2).contiguous()
