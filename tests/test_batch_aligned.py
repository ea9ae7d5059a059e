"""Batch-aligned FFN skipping (engine/skip/batch_aligned.py): rows with a budget skip the same
layers once a quorum of them would; budget-0 rows never skip; one row alone is the per-row rule."""
from __future__ import annotations

import random

import pytest

from engine.config import SkipConfig
from engine.skip import DenseGate
from engine.skip.base import RowSkip
from engine.skip.batch_aligned import BatchAlignedGate, BatchAlignedPolicy, quorum_reached
from engine.skip.ffn_skipllm import HostFFNSkipLLMGate
from scripted_ffn import run_layers

LAYERS, COLD_START, COLD_END = 12, 2, 2


def gate(rows, quorum=0.5):
    return BatchAlignedGate(rows, LAYERS, COLD_START, COLD_END, quorum)


def cos_table(rows: int, fires_at: dict[int, int]) -> list[list[float]]:
    """Row r's cosine exceeds 0.9 from layer fires_at[r] - 1 on (so it asks to fire at fires_at[r])."""
    return [[0.99 if r in fires_at and layer >= fires_at[r] - 1 else 0.5 for r in range(rows)]
            for layer in range(LAYERS)]


def test_one_row_is_exactly_the_per_row_rule():
    rng = random.Random(0)
    for _ in range(20):
        rows = [RowSkip(rng.randint(0, 6), rng.uniform(0.6, 0.95))]
        table = [[rng.uniform(0.5, 1.0)] for _ in range(LAYERS)]
        aligned = gate(rows, quorum=rng.choice([0.25, 0.5, 1.0]))
        per_row = HostFFNSkipLLMGate(rows, LAYERS, COLD_START, COLD_END)
        out_aligned, out_per_row = run_layers(aligned, 1, table), run_layers(per_row, 1, table)
        assert aligned.skip_counts(1) == per_row.skip_counts(1)
        assert out_aligned.equal(out_per_row)


def test_budgeted_rows_start_skipping_together_each_for_its_own_budget():
    rows = [RowSkip(3, 0.9), RowSkip(5, 0.9), RowSkip(3, 0.9)]
    table = cos_table(3, {0: 4, 1: 4, 2: 8})  # rows 0 and 1 ask at layer 4, row 2 only at 8
    g = gate(rows, quorum=0.5)
    run_layers(g, 3, table)
    per_row, per_layer = g.skip_counts(3)
    assert per_row == [3, 5, 3]  # row 2 is carried along from layer 4, for its own 3 skips
    assert per_layer == [0] * 4 + [3, 3, 3, 1, 1] + [0] * 3


def test_budget_zero_rows_never_skip():
    rows = [RowSkip(0, 0.9), RowSkip(4, 0.9), RowSkip(0, 0.9)]
    g = gate(rows, quorum=0.5)
    run_layers(g, 3, cos_table(3, {0: 2, 1: 5, 2: 2}))
    assert g.skip_counts(3)[0] == [0, 4, 0]


def test_no_fire_below_the_quorum():
    rows = [RowSkip(2, 0.9)] * 4
    table = cos_table(4, {0: 3, 1: 3, 2: 6})  # 2 of 4 vote at layer 3, 3 of 4 from layer 6
    half, three_quarters, everyone = gate(rows, 0.5), gate(rows, 0.75), gate(rows, 1.0)
    for g in (half, three_quarters, everyone):
        run_layers(g, 4, table)
    assert half.skip_counts(4)[1][3:5] == [4, 4]
    assert three_quarters.skip_counts(4)[1][6:8] == [4, 4] and sum(three_quarters.skip_counts(4)[1]) == 8
    assert everyone.skip_counts(4)[0] == [0, 0, 0, 0]


def test_skipped_rows_keep_h_and_running_rows_get_the_ffn():
    rows = [RowSkip(2, 0.9), RowSkip(0, 0.9)]
    g = gate(rows, quorum=0.5)
    out = run_layers(g, 2, cos_table(2, {0: 3, 1: 3}))
    assert out[0, 2 + 3] == 0 and out[0, 2 + 4] == 0  # row 0 skipped layers 3 and 4
    assert out[1, 2 + 3] > 0 and out[1, 2 + 4] > 0


def test_quorum_is_integer_exact_at_the_boundary():
    assert quorum_reached(3, 10, 300) and not quorum_reached(2, 10, 300)
    assert not quorum_reached(0, 0, 1)


def test_policy_gives_a_dense_gate_when_no_row_may_skip_and_checks_the_quorum():
    policy = BatchAlignedPolicy(SkipConfig(cold_start=COLD_START, cold_end=COLD_END), LAYERS)
    assert isinstance(policy.make_gate([RowSkip(0, 0.9)] * 2, "cpu"), DenseGate)
    assert isinstance(policy.make_gate([RowSkip(0, 0.9), RowSkip(2, 0.9)], "cpu"), BatchAlignedGate)
    with pytest.raises(ValueError):
        BatchAlignedPolicy(SkipConfig(), LAYERS, quorum=0.0)


def test_the_engine_serves_the_batch_aligned_policy(engine, chat_prompts):
    """Selected by name (`--skip-policy batch_aligned`), it drives a real decode batch: budgeted
    rows skip, budget-0 rows beside them never do, and usage counts what was skipped."""
    from dataclasses import replace

    from engine.sampling_params import SamplingParams, SkipParams
    from engine.skip import build_policy

    runner = engine.runner
    per_row = runner.policy
    runner.policy = build_policy(replace(engine.config.skip, policy="batch_aligned"), runner.num_layers)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        budgets = [0.3, 0.0, 0.3, 0.0]
        for i, (prompt, budget) in enumerate(zip(chat_prompts, budgets)):
            engine.add_request(f"aligned-{i}", prompt, params, SkipParams(budget=budget, threshold=0.0))
        last = {}
        while engine.has_work:
            for out in engine.step()[0]:
                last[out.request_id] = out
    finally:
        runner.policy = per_row
    skipped = [last[f"aligned-{i}"].ffn_skipped for i in range(len(budgets))]
    assert skipped[1] == skipped[3] == 0
    assert skipped[0] > 0 and skipped[2] > 0


def test_the_configs_policy_names_are_the_policies_there_are():
    from engine.config import SKIP_POLICIES
    from engine.skip import POLICIES

    assert sorted(SKIP_POLICIES) == sorted(POLICIES)
