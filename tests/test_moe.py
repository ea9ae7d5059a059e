"""A mixture-of-experts GGUF (Qwen3-MoE's layout: Qwen3's attention, a router and SwiGLU experts,
each expert kind one [experts, rows, columns] tensor in the file), small with random weights
(tests/tiny_gguf.py: 4 experts, 2 a token). transformers' model on the same file, dequantized, is
the reference: fp32 logits and greedy text alone and in a staggered batch; the quantized experts
within their activations' rounding; FFN skips over the whole mixture; a served chat answer."""
from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.helpers import (assert_quantized_close_and_skipping, assert_served_chat_is_the_engines, hf_greedy,
                           hf_model_of, prefill_logits, run_staggered)
from tests.tiny_gguf import EXPERTS, LAYERS, USED, tiny_engine, write_tiny_gguf

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 4, "Once upon a time", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe")


@pytest.fixture(scope="module")
def gguf(cache_dir):
    from engine.loader import embedded_gguf

    return write_tiny_gguf(cache_dir / "qwen3moe.gguf", "qwen3moe", embedded_gguf("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def dense(gguf, cache_dir):
    return tiny_engine(gguf, cache_dir, "float32")


@pytest.fixture(scope="module")
def reference(dense):
    """transformers' model on the same file, and the prompts as token ids."""
    return hf_model_of(dense), [dense.tokenizer.encode(text) for text in TEXTS]


def test_fp32_logits_and_greedy_text_equal_hf(dense, reference):
    hf_model, prompts = reference
    model = dense.runner.model
    assert type(model).__name__ == "Qwen3MoeModel" and model.fused_decode is None  # the per-op path
    assert (model.cfg.num_experts, model.cfg.num_experts_per_tok, model.cfg.norm_topk_prob) == (EXPERTS, USED, True)
    assert type(hf_model).__name__ == "Qwen3MoeForCausalLM"
    for prompt in prompts:
        with torch.inference_mode():
            theirs = hf_model(torch.tensor([prompt])).logits[0].float()
        ours = prefill_logits(dense, prompt)
        assert theirs.abs().max().item() > 1.0
        assert (ours - theirs).abs().max().item() < 1e-3
    expected = [hf_greedy(hf_model, prompt, GREEDY.max_tokens) for prompt in prompts]
    assert len({tuple(t) for t in expected}) == len(prompts)
    assert [dense.generate([p], GREEDY)[0][1] for p in prompts] == expected
    assert run_staggered(dense, prompts, GREEDY, join_every=2) == expected


def test_every_expert_is_routed_to_and_the_router_picks_as_transformers(dense, reference):
    """Per hidden state the engine's router chooses transformers' experts, and 64 random states
    reach every expert of the layer (so the logits test above could route through any)."""
    layer, hf_layer = dense.runner.model.layers[1], reference[0].model.layers[1]
    x = torch.randn(64, dense.runner.model.cfg.hidden_size)
    with torch.inference_mode():
        _, _, theirs = hf_layer.mlp.gate(x)
        ours = torch.softmax(layer.router(x).float(), dim=-1).topk(USED, dim=-1).indices
    assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values)
    assert set(ours.flatten().tolist()) == set(range(EXPERTS))


def test_quantized_experts_come_within_rounding_of_fp32(gguf, cache_dir, dense, reference):
    prompts = reference[1]
    quantized = tiny_engine(gguf, cache_dir, "auto")
    if not quantized.runner.quantized:
        pytest.skip("no quantized kernel for this CPU (x86-64-v3 or newer) or no native library")
    layer = quantized.runner.model.layers[0]
    assert layer.experts[0][0].backend.startswith("quant-")
    assert_quantized_close_and_skipping(quantized, dense, prompts, GREEDY, LAYERS)


def test_served_over_http(dense, gguf, cache_dir):
    assert_served_chat_is_the_engines(dense, gguf, cache_dir)
