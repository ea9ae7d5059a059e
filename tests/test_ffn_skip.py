"""FFN-SkipLLM in the engine: exact accounting, cold layers, warm-up, prefill, batch isolation.

Skipping is verified by counting the FFN rows the model really computed (each layer's `ffn` is
wrapped with a row counter that then calls the real code, and on the native path every call the
C++ step makes to a down-projection kernel is recorded with its rows), not by trusting the gate's
report.
"""
from __future__ import annotations

import contextlib

import pytest

from engine.sampling_params import SamplingParams, SkipParams
from engine.skip import POLICIES
from tests.helpers import recording_down_kernels

SKIPPY = SkipParams(budget=0.4, threshold=0.9, warmup_tokens=0)  # fires for nearly every token


@pytest.fixture
def ffn_rows(engine):
    """Count rows each layer's FFN computes, split by prefill and decode."""
    model = engine.runner.model
    counts = {"prefill": [0] * len(model.layers), "decode": [0] * len(model.layers)}
    originals = [layer.ffn for layer in model.layers]  # bound methods of the real layers
    phase = {"now": "decode"}

    def counting(i, real):
        def ffn(h):
            counts[phase["now"]][i] += h.shape[0]
            return real(h)
        return ffn

    for i, layer in enumerate(model.layers):
        layer.ffn = counting(i, originals[i])
    real_forward = model.forward

    def forward(input_ids, meta, kv, gate):
        phase["now"] = "prefill" if meta.is_prefill else "decode"
        return real_forward(input_ids, meta, kv, gate)

    def record(layer, rows):  # the native decode step's FFNs (none where it does not apply)
        counts[phase["now"]][layer] += rows

    model.forward = forward
    native = model.fused_decode
    with recording_down_kernels(native, record) if native is not None else contextlib.nullcontext():
        yield counts
    for layer in model.layers:
        del layer.ffn  # back to the class's method
    del model.forward


def run_one(engine, prompt, skip, max_tokens=24, request_id="r"):
    engine.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), skip)
    text, last, per_step = "", None, []
    while engine.has_work:
        for out in engine.step()[0]:
            if out.request_id == request_id:
                text += out.text
                last = out
                per_step.append(out.ffn_skipped)
    return text, last, per_step


def test_budget_zero_is_identical_to_skipping_disabled(engine, chat_prompts):
    text_budget0, _, _ = run_one(engine, chat_prompts[3], SkipParams(budget=0.0, threshold=0.5, warmup_tokens=0))
    policy = engine.runner.policy
    engine.runner.policy = POLICIES["none"](engine.config.skip, engine.model_config.num_layers)
    try:
        text_off, last, _ = run_one(engine, chat_prompts[3], None)
    finally:
        engine.runner.policy = policy
    assert text_budget0 == text_off and last.ffn_skipped == 0


@pytest.mark.parametrize("short_chunk_rows", [0, 64])  # the prompt as a prefill forward, or as decode rows
def test_budget_skips_and_usage_equals_what_ran(engine, chat_prompts, ffn_rows, short_chunk_rows, monkeypatch):
    monkeypatch.setattr(engine.runner, "short_chunk_rows", short_chunk_rows)
    _, last, _ = run_one(engine, chat_prompts[2], SKIPPY, max_tokens=24, request_id=f"rows-{short_chunk_rows}")
    layers = engine.model_config.num_layers
    ratio = last.ffn_skipped / last.ffn_total
    assert last.ffn_total == layers * last.completion_tokens
    assert 0 < ratio <= SKIPPY.budget
    # the first token comes from the (dense) prefill; every later token from one decode step. A short
    # prompt (or its part not served by the prefix cache) is computed as decode rows of its own
    # (engine/model_runner.py short_chunk_rows), which run every FFN too
    prompt_rows = len(chat_prompts[2]) - last.cached_tokens
    as_rows = prompt_rows <= engine.runner.short_chunk_rows
    assert sum(ffn_rows["decode"]) == layers * (last.completion_tokens - 1 + as_rows * prompt_rows) - last.ffn_skipped
    # prefill never skipped: every prompt token not served by the prefix cache ran every FFN
    assert ffn_rows["prefill"] == [0 if as_rows else prompt_rows] * layers


def test_cold_layers_are_never_skipped(engine, chat_prompts):
    before = list(engine.layer_ffn_skipped)
    run_one(engine, chat_prompts[0], SkipParams(budget=0.5, threshold=0.0, warmup_tokens=0), max_tokens=16)
    delta = [a - b for a, b in zip(engine.layer_ffn_skipped, before)]
    cfg = engine.config.skip
    layers = engine.model_config.num_layers
    cold = list(range(cfg.cold_start)) + list(range(layers - cfg.cold_end, layers))
    assert all(delta[i] == 0 for i in cold)
    assert sum(delta) > 0


def test_cold_layers_covering_the_model_are_said_at_start(caplog):
    """--skip-cold-start 100 on a 30-layer model: every FFN runs whatever the budget, and the start says so."""
    from engine.config import SkipConfig
    from engine.skip import build_policy

    for policy, cold_start, said in (("ffn_skipllm", 100, True), ("batch_aligned", 26, True),
                                     ("ffn_skipllm", 25, False), ("none", 100, False)):
        caplog.clear()
        built = build_policy(SkipConfig(policy=policy, cold_start=cold_start, cold_end=4), 30)
        assert ("no FFN is ever skipped" in caplog.text) == said, (policy, cold_start)
        assert built.max_skippable == max(0, 30 - cold_start - 4) or policy == "none"


def test_warmup_tokens_are_never_skipped(engine, chat_prompts):
    _, last, per_step = run_one(engine, chat_prompts[1], SkipParams(budget=0.4, threshold=0.0, warmup_tokens=10),
                                max_tokens=20)
    assert per_step[:10] == [0] * 10  # cumulative skipped count stays 0 through the warm-up
    assert last.ffn_skipped > 0


def test_dense_request_in_a_skipping_batch_is_identical_to_alone(engine, chat_prompts):
    alone, _, _ = run_one(engine, chat_prompts[4], SkipParams(budget=0.0), max_tokens=32, request_id="dense")
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"neighbour-{i}", chat_prompts[i], params, SKIPPY)
    engine.add_request("dense", chat_prompts[4], params, SkipParams(budget=0.0))
    texts, skipped = {}, {}
    while engine.has_work:
        for out in engine.step()[0]:
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
            skipped[out.request_id] = out.ffn_skipped
    assert all(skipped[f"neighbour-{i}"] > 0 for i in range(3))
    assert skipped["dense"] == 0
    assert texts["dense"] == alone


def test_host_and_device_gates_make_the_same_decisions(engine):
    """The CPU gate (Python decisions, gathered rows) and the CUDA gate (tensor decisions, masked)
    implement one rule: same outputs and counts on real FFNs, rows firing at different layers."""
    import torch

    from engine.skip.base import RowSkip
    from engine.skip.ffn_skipllm import FFNSkipLLMGate, HostFFNSkipLLMGate

    layers = engine.runner.model.layers
    cfg = engine.config.skip
    rows = [RowSkip(6, 0.0), RowSkip(6, 0.5), RowSkip(3, 0.9), RowSkip(6, 1.1), RowSkip(0, 0.0)]
    torch.manual_seed(0)
    start = torch.randn(len(rows), engine.model_config.hidden_size)
    host = HostFFNSkipLLMGate(rows, len(layers), cfg.cold_start, cfg.cold_end)
    device = FFNSkipLLMGate(rows, len(layers), cfg.cold_start, cfg.cold_end, torch.device("cpu"))
    with torch.inference_mode():
        a = b = start
        for i, layer in enumerate(layers):
            a = host(i, a + 0.01 * i, layer.ffn)
            b = device(i, b + 0.01 * i, layer.ffn)
    assert host.skip_counts(len(rows)) == device.skip_counts(len(rows))
    per_row, _ = host.skip_counts(len(rows))
    assert per_row[0] == 6 and per_row[3] == 0 and per_row[4] == 0  # fires at once / never / may not
    # equal up to fp32 rounding: the host gate multiplies gathered rows, the device gate all rows
    # (30 layers on random inputs amplify that rounding to ~1e-5 of the row norm)
    assert ((a - b).norm(dim=-1) / a.norm(dim=-1)).max() < 1e-4
