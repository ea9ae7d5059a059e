"""bench/gpu.py's parts that do not need a GPU: its 7B shape is Llama-2-7B's, its arithmetic, and a
clear refusal where there is no CUDA device."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu import LLAMA_7B_SHAPE, skip_ceiling  # noqa: E402


def test_the_7b_shape_is_llama_2_7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, **LLAMA_7B_SHAPE))
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616


def test_the_moe_shape_is_qwen3_30b_a3b_per_layer():
    """A quarter of Qwen3-30B-A3B's 48 layers: 30.5 B parameters in all (its model card), of which
    these 12 layers hold a quarter of what its layers hold."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from bench.gpu import QWEN3_30B_A3B_SHAPE

    config = Qwen3MoeConfig(vocab_size=151936, **{**QWEN3_30B_A3B_SHAPE, "num_hidden_layers": 48})
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert 30.4e9 < total < 30.6e9, total


def test_skip_ceiling_is_bytes_over_bytes_left():
    # PERF.md: SmolLM2's FFNs are 79.6 M of 134.5 M parameters; skipping 25% of them -> ~1.17x
    assert skip_ceiling(134.5, 79.6, 0.25) == pytest.approx(134.5 / (134.5 - 19.9))
    assert skip_ceiling(134.5, 79.6, 0.0) == 1.0


def test_its_skip_settings_are_ones_the_engine_takes():
    """bench/gpu.py runs these on a GPU only: a setting the engine refuses would fail there alone."""
    from bench.gpu import BENCH_SKIP, FORCED_SKIP, NEVER_FIRES
    from engine.sampling_params import SkipParams
    from engine.skip.settings import resolve_skip

    forced = resolve_skip(BENCH_SKIP, SkipParams(**FORCED_SKIP))
    idle = resolve_skip(BENCH_SKIP, SkipParams(**NEVER_FIRES))
    assert forced.budget == idle.budget == 0.25 and forced.threshold == -1.0
    assert idle.threshold >= 1.0  # a cosine never exceeds 1: the gated step runs, nothing is skipped


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on hosts without CUDA")
def test_refuses_with_a_message_without_cuda():
    proc = subprocess.run([sys.executable, "bench/gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "needs a CUDA device" in proc.stderr
