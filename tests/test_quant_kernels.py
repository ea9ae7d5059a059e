"""The quantized weights and kernels against the `gguf` package's own dequantization.

Random blocks of every supported GGUF format (random integers and scale bits, sane fp16 scales)
are repacked (engine/quant/formats.py), tiled for the kernel (engine/quant/tiled.py) and
multiplied by both builds of the kernel (AVX-512 and AVX2, each where this CPU runs it: an AVX-512
host runs both), with odd row and output counts that exercise every tile shape, against
`gguf.quants.dequantize` in fp64.
"""
import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from engine import native
from engine.native import quant_ops
from engine.quant import QuantWeight
from engine.quant.formats import BLOCK_WEIGHTS, SUPPORTED, to_weight
from engine.quant.tiled import TiledWeight
from tests import quant_blocks

ROW_COUNTS = (1, 2, 3, 4, 5, 6, 7, 9, 16)  # 1-row GEMV, every partial tile of 8 rows (both builds), 16 rows
INT16_MAX = 32767  # the kernel's activations: int16 per group, s = max|x| / 32767


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    lib = native.load(str(tmp_path_factory.mktemp("cache")))
    assert lib is not None, "g++ is on these machines: the kernels must build"
    return lib


def random_blocks(kind: str, rows: int, blocks: int, seed: int) -> np.ndarray:
    return quant_blocks.random_blocks(kind, rows, blocks, np.random.default_rng(seed))


def reference(kind: str, raw: np.ndarray) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind]).astype(np.float32))


@pytest.mark.parametrize("kind", SUPPORTED)
def test_repacked_weights_dequantize_as_gguf_does(kind):
    """Lossless: the integers, scales and offsets reproduce gguf's fp32 values exactly (both apply
    the same fp32 multiply and add per weight, and the repacking moves bits without rounding)."""
    raw = random_blocks(kind, 9, 3, seed=len(kind))
    weight = to_weight(kind, raw, 3 * BLOCK_WEIGHTS[kind])
    assert torch.equal(weight.dequantize(), reference(kind, raw))
    tiled = TiledWeight.from_weight(weight)  # 9 outputs: one tile, 7 rows of padding
    assert torch.equal(tiled.dequantize(), weight.dequantize())
    ids = torch.tensor([[8, 0], [3, 3]])
    assert torch.equal(tiled[ids], weight.dequantize()[ids])


@pytest.mark.parametrize("kind", SUPPORTED)
def test_native_tiling_is_the_torch_tiling_byte_for_byte(kernels, kind):
    """The integers tiled in one pass of the native library (load time: a 30B mixture's 12,288
    expert matrices) are the torch path's bytes, padding rows included (9 and 37 outputs)."""
    for rows in (9, 37):
        weight = to_weight(kind, random_blocks(kind, rows, 3, seed=rows), 3 * BLOCK_WEIGHTS[kind])
        tiled = TiledWeight.from_weight(weight)
        with native.disabled():
            in_torch = TiledWeight.from_weight(weight)
        assert tiled.q.shape == in_torch.q.shape and torch.equal(tiled.q, in_torch.q)
        assert torch.equal(tiled.dequantize(), weight.dequantize())


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "MXFP4"])
@pytest.mark.parametrize("rows", [(32, 16, 9), (9, 32)])
def test_row_blocks_tile_as_their_stack(kernels, kind, rows):
    """A fused projection's row blocks (a gate|up) tiled each into its place give the bytes of their
    stack tiled, natively and in torch; blocks that end inside a tile (9 rows) are stacked first."""
    n = 2 * BLOCK_WEIGHTS[kind]
    parts = [to_weight(kind, random_blocks(kind, r, 2, seed=r), n) for r in rows]
    stacked = TiledWeight.from_weight(QuantWeight.cat(parts))
    for native_on in (True, False):
        with contextlib.nullcontext() if native_on else native.disabled():
            tiled = TiledWeight.from_weight(parts)
        for a, b in ((tiled.q, stacked.q), (tiled.scale, stacked.scale), (tiled.offset, stacked.offset)):
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
        assert tiled.shape == stacked.shape and tiled.source == stacked.source


def activation_rounding_bound(x: torch.Tensor, w: torch.Tensor, group: int) -> torch.Tensor:
    """|y - x W^T| from rounding x to int16 steps of s = max|x| / 32767 per group: at most s / 2
    per input (plus 1e-3 of it for s and 1 / s being fp32), times the weights it multiplies."""
    rows, n = x.shape
    s = x.abs().view(rows, n // group, group).amax(-1) / INT16_MAX  # [rows, groups]
    w_sums = w.abs().view(w.shape[0], n // group, group).sum(-1)  # [out, groups]
    return (s * 0.5 * (1 + 1e-3)) @ w_sums.T


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("kind", SUPPORTED)
@pytest.mark.parametrize("out_features", [1, 37])
def test_kernel_matches_gguf_dequantization(kernels, isa, kind, out_features):
    """Per output, |ours - fp64 reference| <= the activations' int16 rounding (see
    `activation_rounding_bound`, ~2^-16 of each group's largest input) + n * eps32 * sum_i |x_i w_i|
    (n = inputs), the worst-case bound of the fp32 sums over groups. The integer products are exact.
    A wrong layout or scale misses by O(|y|), far outside."""
    if isa not in quant_ops.isas():
        pytest.skip(f"this CPU does not run the {isa} build")
    blocks = 2 if kind.endswith("_K") else 5
    n = blocks * BLOCK_WEIGHTS[kind]
    raw = random_blocks(kind, out_features, blocks, seed=out_features)
    weight = TiledWeight.from_weight(to_weight(kind, raw, n))
    ref_w = reference(kind, raw).double()
    gen = torch.Generator().manual_seed(n)
    for rows in ROW_COUNTS:
        x = torch.randn(rows, n, generator=gen)
        x[0, 3] = 40.0  # an outlier, as real activations have: its group's other inputs get coarser steps
        bias = torch.randn(out_features, generator=gen)
        y = quant_ops.linear(x, weight, bias, quant_ops.kernel(isa))
        ref = x.double() @ ref_w.T + bias.double()
        bound = (activation_rounding_bound(x.double(), ref_w, weight.group)
                 + n * torch.finfo(torch.float32).eps * ((x.double().abs() @ ref_w.abs().T) + bias.double().abs()))
        assert ((y.double() - ref).abs() <= bound).all(), (kind, isa, rows)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q6_K", "MXFP4"])
def test_kernel_is_batch_invariant(kernels, isa, kind):
    """A row's outputs are the same bits whatever else is in the call (one row, or inside 16)."""
    if isa not in quant_ops.isas():
        pytest.skip(f"this CPU does not run the {isa} build")
    n = 2 * 256
    weight = TiledWeight.from_weight(to_weight(kind, random_blocks(kind, 45, n // BLOCK_WEIGHTS[kind], seed=3), n))
    x = torch.randn(16, n, generator=torch.Generator().manual_seed(5))
    kernel = quant_ops.kernel(isa)
    together = quant_ops.linear(x, weight, None, kernel)
    for r in range(16):
        assert torch.equal(quant_ops.linear(x[r:r + 1], weight, None, kernel), together[r:r + 1])


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q6_K", "IQ4_XS", "MXFP4"])
def test_both_builds_give_the_same_bits(kernels, kind):
    """The AVX2 and AVX-512 builds quantize activations alike, sum integers exactly and apply the
    same fp32 operations per output, so an AVX2 host serves what an AVX-512 host does."""
    if quant_ops.isas() != ["avx512", "avx2"]:
        pytest.skip("needs a CPU that runs both builds (AVX-512 with VNNI)")
    n = 4 * 256
    weight = TiledWeight.from_weight(to_weight(kind, random_blocks(kind, 40, n // BLOCK_WEIGHTS[kind], seed=4), n))
    x = torch.randn(7, n, generator=torch.Generator().manual_seed(6))
    assert torch.equal(quant_ops.linear(x, weight, None, quant_ops.kernel("avx512")),
                       quant_ops.linear(x, weight, None, quant_ops.kernel("avx2")))


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_fp16_scales_where_the_format_has_them(kernels, isa):
    """Q4_0, Q4_1 and Q8_0 (fp16 scales in the file) tile with fp16 scales and offsets, K-quants
    (an fp16 scale times an integer) keep fp32; the same weight read either way gives the same bits."""
    if isa not in quant_ops.isas():
        pytest.skip(f"this CPU does not run the {isa} build")
    n = 2 * 256
    x = torch.randn(9, n, generator=torch.Generator().manual_seed(7))
    kernel = quant_ops.kernel(isa)
    for kind, bits in [("Q4_0", 16), ("Q4_1", 16), ("Q8_0", 16), ("Q4_K", 32), ("Q6_K", 32)]:
        weight = TiledWeight.from_weight(to_weight(kind, random_blocks(kind, 21, n // BLOCK_WEIGHTS[kind], seed=8), n))
        assert weight.scale_bits == bits, kind
        if bits == 16:
            wide = dataclasses.replace(weight, scale=weight.scale.float(),
                                       offset=None if weight.offset is None else weight.offset.float())
            assert wide.scale_bits == 32
            assert torch.equal(quant_ops.linear(x, weight, None, kernel), quant_ops.linear(x, wide, None, kernel)), kind


def test_stacked_weights_run_as_their_parts(kernels):
    """q|k|v stacked into one weight (one call) gives each part's outputs; rows permute losslessly."""
    isa = quant_ops.best_isa()
    parts = [to_weight("Q4_1", random_blocks("Q4_1", rows, 4, seed=rows), 128) for rows in (64, 32, 32)]
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    kernel = quant_ops.kernel(isa)
    stacked = quant_ops.linear(x, TiledWeight.from_weight(QuantWeight.cat(parts)), None, kernel)
    assert torch.equal(stacked, torch.cat([quant_ops.linear(x, TiledWeight.from_weight(p), None, kernel)
                                           for p in parts], dim=-1))
    order = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(parts[0].permute_rows(order).dequantize(), parts[0].dequantize()[order])


def test_parts_of_different_layouts_run_side_by_side(kernels):
    """A fused projection whose parts differ (Q4_K_M files: 4-bit q/k, 8-bit v) runs each part
    with its own kernel and concatenates, bias split to match."""
    from engine.backends.cpu.quant_linear import ConcatLinear, make_linear

    parts = [to_weight("Q4_1", random_blocks("Q4_1", 40, 4, seed=7), 128),
             to_weight("Q8_0", random_blocks("Q8_0", 24, 4, seed=8), 128)]
    bias = torch.randn(64, generator=torch.Generator().manual_seed(9))
    layer = make_linear(parts, bias)
    assert isinstance(layer, ConcatLinear) and layer.out_features == 64
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(10))
    dense = torch.cat([p.dequantize() for p in parts]).double()
    err = (layer(x).double() - (x.double() @ dense.T + bias.double())).abs()
    assert (err <= activation_rounding_bound(x.double(), dense, 32) + 1e-5).all()
