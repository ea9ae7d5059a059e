"""GGUF's quantized blocks -> `QuantWeight` (engine/quant/weight.py), without loss.

Each decoder takes one tensor's raw bytes as uint8 [rows, blocks, block bytes] (the layout of
ggml's `block_*` structs) and returns its integers, scales and offsets per group; `to_weight`
packs them into the kernels' layout. The block layouts:
- Q4_0 (32 weights, 18 bytes): fp16 d, 16 bytes of nibbles; w = d * (q - 8)
- Q4_1 (32, 20): fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m
- Q5_0 (32, 22): fp16 d, 32 high bits, 16 bytes of nibbles; w = d * (q - 16)
- Q5_1 (32, 24): fp16 d, fp16 m, 32 high bits, nibbles; w = d * q + m
- Q8_0 (32, 34): fp16 d, 32 signed bytes; w = d * q
- Q4_K (256, 144): fp16 d, fp16 dmin, 8 x (6-bit scale, 6-bit min) in 12 bytes, 128 bytes of
  nibbles (each 32 bytes: one sub-block in the low nibbles, the next in the high ones);
  w = d * scale * q - dmin * min per sub-block of 32
- Q5_K (256, 176): as Q4_K plus 32 bytes of high bits (bit i of byte l: weight l of sub-block i)
- Q6_K (256, 210): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed 8-bit scales,
  fp16 d; w = d * scale * (q - 32) per group of 16
- Q2_K (256, 84): 16 bytes of (4-bit scale, 4-bit min), 64 bytes of 2-bit q, fp16 d, fp16 dmin;
  w = d * scale * q - dmin * min per group of 16
- Q3_K (256, 110): 32 bytes of high bits, 64 bytes of 2-bit lows, 16 6-bit scales in 12 bytes,
  fp16 d; w = d * (scale - 32) * (q - 4) per group of 16, q = low | high << 2
- IQ4_NL (32, 18): fp16 d, 16 bytes of nibbles indexing a 16-entry int8 table; w = d * table[q]
- IQ4_XS (256, 136): fp16 d, 8 6-bit scales (16 bits of highs, 4 bytes of low nibbles), 128 bytes
  of nibbles as IQ4_NL's; w = d * (scale - 32) * table[q] per group of 32
- MXFP4 (32, 17): an E8M0 exponent e, 16 bytes of nibbles indexing the doubled E2M1 values
  (0, 1, 2, 3, 4, 6, 8, 12 and their negatives); w = 2^(e - 128) * table[q] (gpt-oss's experts)
In every case the nibbles of a 32-weight group put weight j in the low and j + 16 in the high
nibble of byte j (Q4_0/Q4_1 as stored; the K-quants after regrouping), the 4-bit layout's order.
Q2_K and Q3_K go to the 8-bit layout (Q3_K's q - 4 in -4..3 are signed bytes), so they take 8 bits
a weight in memory plus the scales (8.5-9 in all), more than their files' 2.6-3.4, and 3/8 or less
of the fp32 they were expanded to before. IQ4_NL, IQ4_XS and MXFP4 keep their nibbles with their
table of values (`TABLES`: IQ4's -127..113, MXFP4's -12..12): 4 bits a weight plus the scales, as
in their files. MXFP4's power-of-two scales are exact in fp32 (fp16 for the exponents of real
weights).
"""
from __future__ import annotations

import numpy as np
import torch

from engine.quant.weight import QuantWeight

BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210,
               "Q2_K": 84, "Q3_K": 110, "IQ4_NL": 18, "IQ4_XS": 136, "MXFP4": 17}
SUPPORTED = tuple(BLOCK_BYTES)
BLOCK_WEIGHTS = {kind: 256 if kind.endswith(("_K", "_XS")) else 32 for kind in SUPPORTED}
IQ4_TABLE = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
MXFP4_TABLE = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
# formats whose 4-bit q index a table of values (QuantWeight.table)
TABLES = {"IQ4_NL": IQ4_TABLE, "IQ4_XS": IQ4_TABLE, "MXFP4": MXFP4_TABLE}
NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8)
TWO_BIT_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block, as fp32 [rows, blocks]."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: low nibbles, then high nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _bit_planes(packed: np.ndarray) -> np.ndarray:
    """[..., 32] bytes -> [..., 8, 32] of 0/1: plane i holds bit i of each byte."""
    return packed[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None] & 1


def _crumbs(packed: np.ndarray) -> np.ndarray:
    """[..., 64] bytes of 2-bit values -> [..., 8, 32]: the first 32 bytes' bits 0-1, 2-3, 4-5, 6-7,
    then the next 32 bytes' (Q2_K's and Q3_K's low bits, Q6_K's high bits)."""
    runs = packed.reshape(*packed.shape[:-1], 2, 1, 32) >> TWO_BIT_SHIFTS[:, None] & 3
    return runs.reshape(*packed.shape[:-1], 8, 32)


def _high_bits(blocks: np.ndarray, at: int) -> np.ndarray:
    """32 bits at byte `at` (little endian) -> [rows, blocks, 32] of 0/1, bit j for weight j."""
    bits = np.unpackbits(np.ascontiguousarray(blocks[..., at:at + 4]), axis=-1, bitorder="little")
    return bits


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> (scales, mins) [rows, blocks, 8] of 6-bit integers. Bytes 0-3: scale
    0-3 (low 6 bits) and the top 2 bits of scale 4-7; bytes 4-7: min 0-3 and the top bits of min 4-7;
    bytes 8-11: the low 4 bits of scale 4-7 (low nibble) and min 4-7 (high nibble)."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_sub_blocks(packed: np.ndarray) -> np.ndarray:
    """K-quants' 128 bytes of nibbles -> [rows, blocks, 8, 32]: chunk c's low nibbles are sub-block
    2c, its high nibbles sub-block 2c + 1."""
    chunks = packed.reshape(*packed.shape[:-1], 4, 1, 32)
    return (chunks >> NIBBLE_SHIFTS[:, None] & 0x0F).reshape(*packed.shape[:-1], 8, 32)


def _decode(kind: str, b: np.ndarray):
    """-> (integers [rows, groups, group], scale [rows, groups], offset or None, bits). 4-bit integers
    come one a byte ([..., 32]), or as the file packs them ([..., 16]: byte j holds weight j in its
    low nibble and j + 16 in its high one, the kernels' layout: Q4_0, Q4_1, IQ4_NL, MXFP4), which
    spares unpacking and packing them again at load."""
    rows = b.shape[0]
    if kind == "Q4_0":
        d = _f16(b, 0)
        return b[..., 2:18], d, -8.0 * d, 4
    if kind == "Q4_1":
        return b[..., 4:20], _f16(b, 0), _f16(b, 2), 4
    if kind in ("Q5_0", "Q5_1"):
        start = 2 if kind == "Q5_0" else 4
        q = _nibbles(b[..., start + 4:start + 20]) | (_high_bits(b, start) << 4)
        if kind == "Q5_0":
            return q.astype(np.int8) - 16, _f16(b, 0), None, 8
        return q, _f16(b, 0), _f16(b, 2), 8
    if kind == "Q8_0":
        return b[..., 2:34].view(np.int8), _f16(b, 0), None, 8
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
        scales, mins = _k_scales(b[..., 4:16])
        scale, offset = (d * scales).reshape(rows, -1), (-(dmin * mins)).reshape(rows, -1)
        if kind == "Q4_K":
            return _k_sub_blocks(b[..., 16:144]).reshape(rows, -1, 32), scale, offset, 4
        q = _k_sub_blocks(b[..., 48:176]) | (_bit_planes(b[..., 16:48]) << 4)
        return q.reshape(rows, -1, 32), scale, offset, 8
    if kind == "Q6_K":
        low = b[..., 0:128].reshape(rows, -1, 2, 1, 64) >> NIBBLE_SHIFTS[:, None] & 0x0F
        q = low.reshape(rows, -1, 8, 32) | (_crumbs(b[..., 128:192]) << 4)  # halves of 128: 4 runs of 32
        scale = _f16(b, 208)[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
        return q.astype(np.int8).reshape(rows, -1, 16) - 32, scale.reshape(rows, -1), None, 8
    if kind == "Q2_K":  # per 128 weights, 32 bytes: group 2s + h is bits 2s..2s+1 of bytes 16h..16h+15
        q = _crumbs(b[..., 16:80])
        d, dmin = _f16(b, 80)[..., None], _f16(b, 82)[..., None]
        scale, offset = d * (b[..., 0:16] & 0x0F), -(dmin * (b[..., 0:16] >> 4))
        return q.reshape(rows, -1, 16), scale.reshape(rows, -1), offset.reshape(rows, -1), 8
    if kind == "Q3_K":  # the lows as Q2_K's; group g's high bit is bit g // 2 of the 32 bytes
        q = _crumbs(b[..., 32:96]).astype(np.int8) + (_bit_planes(b[..., 0:32]).astype(np.int8) << 2) - 4
        packed = b[..., 96:108]
        six = _nibbles(packed[..., 0:8]) | \
            ((packed[..., 8:12].reshape(rows, -1, 1, 4) >> TWO_BIT_SHIFTS[:, None] & 3).reshape(rows, -1, 16) << 4)
        scale = _f16(b, 108)[..., None] * (six.astype(np.float32) - 32)
        return q.reshape(rows, -1, 16), scale.reshape(rows, -1), None, 8
    if kind == "IQ4_NL":
        return b[..., 2:18], _f16(b, 0), None, 4
    if kind == "IQ4_XS":
        highs = np.ascontiguousarray(b[..., 2:4]).view(np.uint16)  # [rows, blocks, 1]
        six = ((b[..., 4:8, None] >> NIBBLE_SHIFTS & 0x0F).reshape(rows, -1, 8)
               | (highs >> (2 * np.arange(8, dtype=np.uint16)) & 3).astype(np.uint8) << 4)
        scale = _f16(b, 0)[..., None] * (six.astype(np.float32) - 32)
        q = _nibbles(b[..., 8:136].reshape(rows, -1, 8, 16))
        return q.reshape(rows, -1, 32), scale.reshape(rows, -1), None, 4
    if kind == "MXFP4":  # 2^(e - 128): ggml's e8m0 "half" (e < 2 are fp32 subnormals, written as bits)
        e = b[..., 0].astype(np.uint32)
        half = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32).view(np.float32)
        return b[..., 1:17], half, None, 4
    raise ValueError(f"unsupported GGUF format {kind}")


def to_weight(kind: str, raw: np.ndarray, in_features: int) -> QuantWeight:
    """raw: uint8 [rows, bytes] of one tensor in GGUF format `kind` -> QuantWeight [rows, in_features]."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1, BLOCK_BYTES[kind])
    q, scale, offset, bits = _decode(kind, blocks)
    rows, group = q.shape[0], 32 if bits == 4 else q.shape[-1]
    if bits == 4 and q.shape[-1] == 16:  # packed as the kernels take them
        packed = q
    elif bits == 4:
        q = q.reshape(rows, -1, group).astype(np.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
    else:
        q = q.reshape(rows, -1, group)
        packed = q.astype(np.int8).view(np.uint8)
    weight = QuantWeight(q=torch.from_numpy(np.ascontiguousarray(packed).reshape(rows, -1)),
                         scale=torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, -1)),
                         offset=None if offset is None else torch.from_numpy(
                             np.ascontiguousarray(offset, dtype=np.float32).reshape(rows, -1)),
                         bits=bits, group=group, source=kind,
                         table=torch.from_numpy(TABLES[kind].copy()) if kind in TABLES else None)
    assert weight.shape == (rows, in_features), (weight.shape, rows, in_features)
    return weight
