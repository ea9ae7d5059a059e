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
In every case the nibbles of a 32-weight group put weight j in the low and j + 16 in the high
nibble of byte j (Q4_0/Q4_1 as stored; the K-quants after regrouping), the 4-bit layout's order.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.quant.weight import QuantWeight

BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
SUPPORTED = tuple(BLOCK_BYTES)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block, as fp32 [rows, blocks]."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: low nibbles, then high nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


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
    return (chunks >> np.array([0, 4], dtype=np.uint8).reshape(2, 1) & 0x0F).reshape(*packed.shape[:-1], 8, 32)


def _decode(kind: str, b: np.ndarray):
    """-> (integers [rows, groups, group], scale [rows, groups], offset or None, bits)."""
    rows = b.shape[0]
    if kind == "Q4_0":
        d = _f16(b, 0)
        return _nibbles(b[..., 2:18]), d, -8.0 * d, 4
    if kind == "Q4_1":
        return _nibbles(b[..., 4:20]), _f16(b, 0), _f16(b, 2), 4
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
        high = (b[..., 16:48, None] >> np.arange(8, dtype=np.uint8) & 1).swapaxes(-1, -2)  # [rows, blocks, 8, 32]
        q = _k_sub_blocks(b[..., 48:176]) | (high << 4)
        return q.reshape(rows, -1, 32), scale, offset, 8
    if kind == "Q6_K":
        low = b[..., 0:128].reshape(rows, -1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1) & 0x0F
        high = b[..., 128:192].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1) & 3
        q = low.reshape(rows, -1, 2, 4, 32) | (high << 4)  # halves of 128: 4 runs of 32
        scale = _f16(b, 208)[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
        return q.astype(np.int8).reshape(rows, -1, 16) - 32, scale.reshape(rows, -1), None, 8
    raise ValueError(f"unsupported GGUF format {kind}")


def to_weight(kind: str, raw: np.ndarray, in_features: int) -> QuantWeight:
    """raw: uint8 [rows, bytes] of one tensor in GGUF format `kind` -> QuantWeight [rows, in_features]."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1, BLOCK_BYTES[kind])
    q, scale, offset, bits = _decode(kind, blocks)
    rows, group = q.shape[0], q.shape[-1]
    q = q.reshape(rows, -1, group)
    if bits == 4:
        q = q.astype(np.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
    else:
        packed = q.astype(np.int8).view(np.uint8)
    weight = QuantWeight(q=torch.from_numpy(np.ascontiguousarray(packed).reshape(rows, -1)),
                         scale=torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, -1)),
                         offset=None if offset is None else torch.from_numpy(
                             np.ascontiguousarray(offset, dtype=np.float32).reshape(rows, -1)),
                         bits=bits, group=group, source=kind)
    assert weight.shape == (rows, in_features), (weight.shape, rows, in_features)
    return weight
