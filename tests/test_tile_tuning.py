"""The masked linear's tiles (engine/backends/cuda/masked_linear.py, tile_tuning.py): every
candidate a GPU may pick computes the same product, and tuning keeps the fastest that runs.
Kernels run compiled on a CUDA device, else under Triton's interpreter (tests/kernel_device.py);
the timings here are a stand-in measure, so which tiles win is known: a real GPU's are in its log."""
from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE, poisoned

from engine.backends.cuda.masked_linear import (CANDIDATES, Tiles, block_rows, default_tiles,  # noqa: E402
                                                masked_linear, tuned_tiles)
from engine.backends.cuda import tile_tuning  # noqa: E402
from engine.backends.cuda.tile_tuning import MaskedProduct, cublas_product, prefer_masked, tune_masked_linear  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_tuning(monkeypatch):
    """Each test tunes from nothing and leaves no choice behind for later tests."""
    from engine.backends.cuda import masked_linear as module

    monkeypatch.setattr(module, "_tuned", {})
    monkeypatch.setattr(tile_tuning, "_reports", {})


def randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("tiles", CANDIDATES, ids=str)
def test_every_candidate_tiling_computes_the_masked_product(tiles):
    """Odd sizes: output and depth not multiples of any tile; one row skips."""
    torch.manual_seed(0)
    rows, n_out, k_in = 3, 150, 300
    x, weight, residual = randn(rows, k_in), randn(n_out, k_in), randn(rows, n_out)
    run = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEVICE)

    got = masked_linear(x, weight, run, residual, out=poisoned(rows, n_out, dtype=torch.bfloat16), tiles=tiles)

    expect = torch.where(run.bool()[:, None], x.float() @ weight.float().T + residual.float(), residual.float())
    torch.testing.assert_close(got.float(), expect, atol=3e-2, rtol=2e-2)


def test_tuning_keeps_the_fastest_tiles_that_run_per_product_and_row_tile():
    from triton.runtime.errors import OutOfResources

    torch.manual_seed(0)
    gate_up, down = randn(96, 40), randn(40, 48)
    products = [MaskedProduct(gate_up), MaskedProduct(down, "silu", residual=True)]
    fastest = {16: Tiles(16, 256), 32: Tiles(64, 64, 4, 4)}  # by the row tile: the stand-in GPU's answer
    refused = Tiles(32, 256)  # as a card without the shared memory for it
    timed = []

    def measure(launch, product, rows, tiles):
        if tiles == refused:
            raise OutOfResources(147456, 101376, "shared memory")
        out = launch()  # the step's very product: its mask, residual and activation
        assert out.shape == (rows, product.weight.shape[0])
        timed.append((tuple(product.weight.shape), rows, tiles))
        return 1.5 if tiles is None else 1.0 if tiles == fastest[rows] else 2.0  # cuBLAS between the two

    reports = tune_masked_linear(products + products[1:], [1, 3, 20], measure)

    assert [(r["shape"], r["rows"], r["measured"]) for r in reports] == [
        ((96, 40), 16, True), ((96, 40), 32, True), ((40, 48), 16, True), ((40, 48), 32, True),
        ((40, 48), 16, False), ((40, 48), 32, False)]  # the repeated product: what was measured for it
    for r in reports:
        assert r["tiles"] == fastest[r["rows"]] and r["ms"] == 1.0 and r["default_ms"] == 2.0 and r["cublas_ms"] == 1.5
        weight, activation = (gate_up, None) if r["shape"] == (96, 40) else (down, "silu")
        assert tuned_tiles(weight, r["rows"], activation) == fastest[r["rows"]]
        assert prefer_masked(weight, r["rows"], activation)  # 1.0 ms against cuBLAS's 1.5
    assert tuned_tiles(gate_up, 7, None) == fastest[16] and block_rows(7) == 16  # any count in the same row tile
    assert tuned_tiles(down, 7, None) is None  # the product without the activation was not tuned
    # every candidate but the refused one, the default tiles and cuBLAS, once per product and row
    # tile: the repeated product is not timed again, nor anything in a second tuning (another engine)
    expected = [(shape, rows, tiles) for shape, gated in (((96, 40), False), ((40, 48), True)) for rows in (16, 32)
                for tiles in {*CANDIDATES, default_tiles(rows, 2, gated), None} if tiles != refused]
    assert sorted(map(str, timed)) == sorted(map(str, expected))
    again = tune_masked_linear(products, [1, 20], measure)  # another engine in this process
    assert len(again) == 4 and not any(r["measured"] for r in again) and len(timed) == len(expected)
    assert not prefer_masked(gate_up, 64, None)  # a row tile never tuned: cuBLAS
    assert default_tiles(1, 2, False) in CANDIDATES and default_tiles(64, 2, False) in CANDIDATES


def test_tuning_lets_an_error_that_is_not_about_the_card_through():
    """A candidate's launch failing for any other reason is a fault, not a tiling to pass over."""
    def measure(launch, product, rows, tiles):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        tune_masked_linear([MaskedProduct(randn(24, 40))], [1], measure)


@pytest.mark.parametrize("activation,residual", [(None, False), ("silu", True), ("gelu_tanh", False)])
def test_the_cublas_side_of_the_comparison_is_the_masked_product_with_every_row_running(activation, residual):
    torch.manual_seed(0)
    rows, n_out, k_in = 3, 40, 48
    x = randn(rows, k_in * (2 if activation else 1))
    weight, res = randn(n_out, k_in), randn(rows, n_out) if residual else None
    run = torch.ones(rows, dtype=torch.int32, device=DEVICE)

    torch.testing.assert_close(cublas_product(x, weight, res, activation).float(),
                               masked_linear(x, weight, run, res, activation=activation).float(), atol=5e-2, rtol=2e-2)
