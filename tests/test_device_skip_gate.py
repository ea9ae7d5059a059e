"""The CUDA decode step's skip gate (engine/backends/cuda/device_gate.py, decisions in Triton
kernels) makes exactly the decisions of the host-side rules it mirrors: FFN-SkipLLM per row
(engine/skip/ffn_skipllm.py) and the batch-aligned rule (engine/skip/batch_aligned.py)."""
from __future__ import annotations

import random

import pytest
import torch

from kernel_device import DEVICE

from engine.backends.cuda.device_gate import DeviceSkipGate  # noqa: E402
from engine.backends.cuda.skip_decision import row_cosine  # noqa: E402
from engine.skip.base import RowSkip  # noqa: E402
from engine.skip.batch_aligned import BatchAlignedGate  # noqa: E402
from engine.skip.ffn_skipllm import FFNSkipLLMGate  # noqa: E402
from scripted_ffn import initial_hidden, masked, branch  # noqa: E402

LAYERS = 10
MAX_ROWS = 8  # the gate's buffers hold more rows than a step uses, as in a graph bucket


def random_step(rng: random.Random, rows: int):
    row_skips = [RowSkip(rng.choice([0, 1, 2, 3, 5]), rng.uniform(0.7, 0.95)) for _ in range(rows)]
    table = [[rng.uniform(0.6, 1.0) for _ in range(rows)] for _ in range(LAYERS)]
    return row_skips, table


def device_gate(row_skips, cold_start, cold_end, quorum):
    max_skips = torch.zeros(MAX_ROWS, dtype=torch.int32, device=DEVICE)
    thresholds = torch.full((MAX_ROWS,), float("inf"), device=DEVICE)
    max_skips[:len(row_skips)] = torch.tensor([r.max_skips for r in row_skips], dtype=torch.int32)
    thresholds[:len(row_skips)] = torch.tensor([r.threshold for r in row_skips])
    return DeviceSkipGate(max_skips, thresholds, LAYERS, cold_start, cold_end, quorum)


def run(gate, rows, table, masked_ffn):
    x = initial_hidden(rows, LAYERS).to(DEVICE)
    for layer in range(LAYERS):
        ffn = branch(layer, table)
        x = gate(layer, x, (lambda h, run, f=ffn: masked(f)(h.cpu(), run if run is None else run.cpu()).to(DEVICE))
                 if masked_ffn else (lambda h, f=ffn: f(h.cpu()).to(DEVICE)))
    return x.cpu()


@pytest.mark.parametrize("cold_start,cold_end", [(2, 2), (0, 3)])
def test_per_row_decisions_equal_ffn_skipllm(cold_start, cold_end):
    rng = random.Random(cold_start)
    gate, skipped = None, 0
    for _ in range(4):
        rows = rng.randint(1, MAX_ROWS)
        row_skips, table = random_step(rng, rows)
        reference = FFNSkipLLMGate(row_skips, LAYERS, cold_start, cold_end, DEVICE)
        expect = run(reference, rows, table, masked_ffn=False)
        gate = gate or device_gate(row_skips, cold_start, cold_end, None)
        fresh = device_gate(row_skips, cold_start, cold_end, None)
        gate.max_skips.copy_(fresh.max_skips)  # a reused gate (as under a graph): new inputs, reset
        gate.thresholds.copy_(fresh.thresholds)
        gate.reset()
        got = run(gate, rows, table, masked_ffn=True)
        assert gate.skip_counts(rows) == reference.skip_counts(rows)
        torch.testing.assert_close(got, expect)
        skipped += sum(reference.skip_counts(rows)[0])
    assert skipped > 0  # the random steps did skip


@pytest.mark.parametrize("quorum", [0.34, 0.5, 1.0])
def test_batch_aligned_decisions_equal_the_host_rule(quorum):
    rng = random.Random(int(quorum * 100))
    skipped = 0
    for _ in range(3):
        rows = rng.randint(2, MAX_ROWS)
        row_skips, table = random_step(rng, rows)
        reference = BatchAlignedGate(row_skips, LAYERS, 2, 2, quorum)
        expect = run(reference, rows, table, masked_ffn=False)
        gate = device_gate(row_skips, 2, 2, quorum)
        got = run(gate, rows, table, masked_ffn=True)
        assert gate.skip_counts(rows) == reference.skip_counts(rows)
        torch.testing.assert_close(got, expect)
        skipped += sum(reference.skip_counts(rows)[0])
    assert skipped > 0


def test_row_cosine_matches_torch():
    a, b = torch.randn(3, 2500, device=DEVICE), torch.randn(3, 2500, device=DEVICE)
    b[1] = a[1] * 2  # parallel: exactly 1
    torch.testing.assert_close(row_cosine(a, b), torch.nn.functional.cosine_similarity(a, b, dim=-1))


@pytest.mark.parametrize("quorum", [None, 0.5])
def test_padded_rows_run_no_hot_ffn_so_a_layer_every_real_row_skips_reads_nothing(quorum):
    """A graph bucket of 4 holding 3 real rows: the padded row (max_skips -1, graphs.PAD_MAX_SKIPS)
    neither fires nor runs a hot layer's FFN, so once the real rows skip a layer no row runs it
    (the masked FFN then reads none of its weights). It once ran every layer: only batches of a
    bucket's own size saved anything."""
    from engine.backends.cuda.graphs import PAD_MAX_SKIPS

    rows, layers = 4, 6
    max_skips = torch.tensor([3, 3, 3, PAD_MAX_SKIPS], dtype=torch.int32, device=DEVICE)
    thresholds = torch.tensor([-1.0, -1.0, -1.0, float("inf")], device=DEVICE)  # real rows fire at once
    gate = DeviceSkipGate(max_skips, thresholds, layers, 1, 1, quorum)
    gate.reset()
    runs = {}

    def ffn_of(layer):
        def ffn(h, run):
            runs[layer] = None if run is None else run.cpu().tolist()
            return h + 1
        return ffn

    h = torch.randn(rows, 16, device=DEVICE)
    for layer in range(layers):
        h = gate(layer, h, ffn_of(layer))
    assert runs[0] is None and runs[layers - 1] is None  # cold layers run for every row
    assert runs[1] == runs[2] == runs[3] == [0, 0, 0, 0]  # fired at the first hot layer: 3 skips
    assert runs[4] == [1, 1, 1, 0]  # skips spent: the real rows run, the padded one does not
    per_row, per_layer = gate.skip_counts(rows)
    assert per_row == [3, 3, 3, 0] and per_layer == [0, 3, 3, 3, 0, 0]


def test_with_no_cold_layer_no_gate_fires_at_the_first_layer_whatever_the_threshold():
    """No layer before the first hot one: no cosine to read (base.NO_COSINE), so even a negative
    threshold fires nothing there: the C++ rule, the Python gates and the device gate alike (the
    last two once read a cosine of 0 there, and a threshold below 0 fired)."""
    rows = [RowSkip(2, -0.5), RowSkip(2, -0.5)]
    table = [[0.9, 0.9] for _ in range(LAYERS)]
    reference = FFNSkipLLMGate(rows, LAYERS, 0, 2, DEVICE)
    run(reference, 2, table, masked_ffn=False)
    gate = device_gate(rows, 0, 2, None)
    run(gate, 2, table, masked_ffn=True)
    for counts in (reference.skip_counts(2), gate.skip_counts(2)):
        assert counts[1][0] == 0 and counts[1][1] == 2  # fired at layer 1, on layer 0's cosine
