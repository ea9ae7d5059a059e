"""Random GGUF blocks of a quantized format: random integers and scale bits, the fp16 scale and min
fields set to small sane values (random bytes there could be inf or nan), MXFP4's exponent byte to
powers of two about as large. Valid blocks of any format, those gguf-py cannot quantize to (Q2_K,
Q3_K, IQ4_NL, IQ4_XS) among them, for the kernels' tests and test files."""
from __future__ import annotations

import numpy as np

from engine.quant.formats import BLOCK_BYTES

FP16_FIELDS = {  # byte offsets of each block's fp16 scale / min fields
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2],
    "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108], "IQ4_NL": [0], "IQ4_XS": [0], "MXFP4": [],
}
E8M0_FIELDS = {"MXFP4": 0}  # byte offset of each block's exponent: a weight is 2^(e - 128) x (0..12)


def random_blocks(kind: str, rows: int, blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """uint8 [rows, blocks * block bytes]: each fp16 field in [scale / 20, scale * 1.05)."""
    raw = rng.integers(0, 256, size=(rows, blocks, BLOCK_BYTES[kind]), dtype=np.uint8)
    for at in FP16_FIELDS[kind]:
        value = ((rng.random((rows, blocks)) + 0.05) * scale).astype(np.float16)
        raw[..., at:at + 2] = value[..., None].view(np.uint8)
    if kind in E8M0_FIELDS:  # exponents that put the largest weights (12 x 2^(e - 128)) around `scale`
        top = 128 + int(np.floor(np.log2(scale / 12)))
        raw[..., E8M0_FIELDS[kind]] = rng.integers(top - 4, top + 1, size=(rows, blocks), dtype=np.uint8)
    return raw.reshape(rows, -1)
