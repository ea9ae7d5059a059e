"""CUDA graphs for decode steps (engine/backends/cuda/graphs.py): buckets, padding and the static
buffers on any host; capture and replay where CUDA is present."""
from __future__ import annotations

import logging

import pytest
import torch

from engine.backends.cuda.graphs import (PAD_MAX_SKIPS, DecodeGraphs, DecodeInputs, StaticDecodeBuffers, batch_buckets,
                                        bucket_for)

BLOCK_SIZE = 16


def test_buckets_are_powers_of_two_to_8_then_steps_of_16_up_to_the_max_batch():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(3) == [1, 2, 3]


def test_a_step_takes_the_smallest_bucket_that_holds_it():
    buckets = batch_buckets(40)
    assert [bucket_for(n, buckets) for n in (1, 3, 5, 9, 16, 17, 33, 40)] == [1, 4, 8, 16, 16, 32, 40, 40]
    assert bucket_for(41, buckets) is None


def step(rows: int) -> DecodeInputs:
    return DecodeInputs(token_ids=[10 + r for r in range(rows)], positions=[16 * r + 5 for r in range(rows)],
                        block_tables=[[7 + r + i for i in range(r + 1)] for r in range(rows)],
                        max_skips=[r % 3 for r in range(rows)], thresholds=[0.9] * rows)


def test_padded_rows_write_nothing_attend_to_nothing_and_never_skip():
    buffers = StaticDecodeBuffers(max_batch=6, max_blocks=5, block_size=BLOCK_SIZE, device="cpu")
    buffers.fill(step(5), 5)  # a longer step first: its rows 3 and 4 must not leak into the next one
    batch = buffers.fill(step(3), 4)
    assert batch.token_ids.tolist() == [10, 11, 12, 0]
    assert batch.positions.tolist() == [5, 21, 37, 0]
    assert batch.context_lens.tolist() == [6, 22, 38, 0]
    # slot = block holding the position * block size + offset; -1 for the padded row
    assert batch.slots.tolist() == [7 * 16 + 5, 9 * 16 + 5, 11 * 16 + 5, -1]
    assert batch.block_tables.tolist() == [[7, 0, 0, 0, 0], [8, 9, 0, 0, 0], [9, 10, 11, 0, 0], [0] * 5]
    assert batch.max_skips.tolist() == [0, 1, 2, PAD_MAX_SKIPS]  # never fires, never runs a hot FFN
    assert batch.thresholds.tolist() == torch.tensor([0.9, 0.9, 0.9, float("inf")]).tolist()  # fp32
    assert [t.dtype for t in vars(batch).values()] == [torch.int64, torch.int64, torch.int32, torch.int32, torch.int64,
                                                       torch.int32, torch.float32]


def test_static_buffers_keep_their_addresses_from_step_to_step():
    buffers = StaticDecodeBuffers(max_batch=8, max_blocks=4, block_size=BLOCK_SIZE, device="cpu")
    addresses = [t.data_ptr() for t in vars(buffers.full).values()]
    first = buffers.fill(step(3), 4)
    second = buffers.fill(step(2), 2)
    assert [t.data_ptr() for t in vars(buffers.full).values()] == addresses
    assert first.token_ids.data_ptr() == second.token_ids.data_ptr() == buffers.full.token_ids.data_ptr()
    assert buffers.full.token_ids[:4].tolist() == [10, 11, 12, 0]  # row 2 of the first step is left as it was


def test_without_captured_graphs_a_step_runs_eagerly_on_exactly_its_rows():
    buffers = StaticDecodeBuffers(max_batch=8, max_blocks=4, block_size=BLOCK_SIZE, device="cpu")
    seen = []

    def forward(batch):
        seen.append(batch.token_ids.shape[0])
        return batch.token_ids * 2

    graphs = DecodeGraphs({"step": forward}, buffers)
    assert graphs.run(step(3), "step").tolist() == [20, 22, 24]
    assert seen == [3]


def test_enforce_eager_is_off_by_default_and_the_flag_turns_it_on():
    from server.cli import build_config, serve_parser

    assert build_config(serve_parser().parse_args([])).enforce_eager is False
    assert build_config(serve_parser().parse_args(["--enforce-eager"])).enforce_eager is True


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def toy_decode_step(buffers, num_layers=6, hidden=128, heads=4, kv_heads=2, head_dim=32, inter=256, blocks=32):
    """A small decoder on the CUDA backend's kernels: projections, K/V write, paged attention and a
    skip gate over masked FFNs, reading only the static buffers."""
    from engine.backends.cuda.decode_attention import paged_decode_attention
    from engine.backends.cuda.device_gate import DeviceSkipGate
    from engine.backends.cuda.masked_ffn import MaskedFFN
    from engine.backends.cuda.masked_linear import masked_linear
    from engine.backends.cuda.write_kv import write_kv

    g = torch.Generator(device="cuda").manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, device="cuda", generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    embed, qkv, o_proj = w(1000, hidden), w((heads + 2 * kv_heads) * head_dim, hidden), w(hidden, heads * head_dim)
    ffns = [MaskedFFN(torch.ones(hidden, device="cuda", dtype=torch.bfloat16), 1e-5, w(2 * inter, hidden),
                      w(hidden, inter)) for _ in range(num_layers)]
    k_cache = torch.zeros(blocks, kv_heads, BLOCK_SIZE, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    gate = DeviceSkipGate(buffers.max_skips, buffers.thresholds, num_layers, 1, 1)

    def forward(batch):
        gate.reset()
        x = embed[batch.token_ids]
        for layer in range(num_layers):
            q, k, v = masked_linear(x, qkv).view(-1, heads + 2 * kv_heads, head_dim).split([heads, kv_heads, kv_heads], 1)
            write_kv(k, v, k_cache, v_cache, batch.slots)
            attn = paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, head_dim ** -0.5)
            x = gate(layer, masked_linear(attn, o_proj, residual=x), ffns[layer])
        return x

    return forward, gate, (k_cache, v_cache)


@cuda
def test_the_backend_finds_its_triton_kernels_launch_here():
    """A host where Triton's launcher cannot be built (no C compiler, no Python headers) falls back to
    the torch path at start; this CUDA host must not."""
    pytest.importorskip("triton")
    from engine.backends.cuda import CUDABackend

    backend = CUDABackend()
    assert backend.triton and backend.decode_reads_kv_in_place


@cuda
def test_replayed_graph_equals_the_eager_step_and_padded_rows_write_nothing():
    buffers = StaticDecodeBuffers(max_batch=8, max_blocks=4, block_size=BLOCK_SIZE, device="cuda")
    forward, gate, caches = toy_decode_step(buffers)
    inputs = step(3)
    inputs.thresholds = [-1.0] * 3  # rows with a budget fire at once
    eager = forward(buffers.fill(inputs, 3)).clone()
    eager_counts = gate.skip_counts(3)
    eager_caches = [c.clone() for c in caches]
    assert not caches[0][0].any()  # block 0 belongs to no row of this step
    graphs = DecodeGraphs({"step": forward}, buffers, buckets=[1, 4, 8])

    assert graphs.capture() and graphs.captured("step") == [1, 4, 8]
    replayed = graphs.run(inputs, "step")  # bucket 4: one padded row

    torch.testing.assert_close(replayed, eager, atol=1e-2, rtol=1e-2)
    assert gate.skip_counts(3) == eager_counts and sum(eager_counts[0]) > 0
    for cache, before in zip(caches, eager_caches):
        torch.testing.assert_close(cache, before, atol=1e-2, rtol=1e-2)  # the same K/V written again
        assert not cache[0].any()  # and nothing for the padded row (whose table points at block 0)


@cuda
def test_a_failed_capture_leaves_every_step_eager(caplog):
    buffers = StaticDecodeBuffers(max_batch=4, max_blocks=4, block_size=BLOCK_SIZE, device="cuda")

    def forward(batch):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("this step cannot be captured")
        return batch.token_ids * 2

    graphs = DecodeGraphs({"step": forward}, buffers)
    with caplog.at_level(logging.WARNING):
        assert not graphs.capture()
    assert "capture failed" in caplog.text and graphs.captured("step") == []
    assert graphs.run(step(2), "step").tolist() == [20, 22]
