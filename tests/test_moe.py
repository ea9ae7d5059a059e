"""A mixture-of-experts GGUF (Qwen3-MoE's layout: Qwen3's attention, a router and SwiGLU experts,
each expert kind one [experts, rows, columns] tensor in the file), small with random weights
(tests/tiny_gguf.py: 4 experts, 2 a token). transformers' model on the same file, dequantized, is
the reference: fp32 logits and greedy text alone and in a staggered batch; the quantized experts
within their activations' rounding; FFN skips over the whole mixture; a served chat answer."""
from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams, SkipParams
from tests.conftest import ServerProcess
from tests.helpers import hf_greedy, hf_model_of, prefill_logits, run_staggered
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
    for prompt in prompts:
        ours, reference = prefill_logits(quantized, prompt), prefill_logits(dense, prompt)
        assert (ours - reference).abs().max().item() < 0.02
    # a threshold every token meets after a short warm-up: the rule skips the budget's k of the hot layers
    skipped = quantized.generate([prompts[0]], GREEDY, SkipParams(budget=0.5, threshold=-1.0, warmup_tokens=2))[0][2]
    assert 0 < skipped.ffn_skipped <= skipped.ffn_total == GREEDY.max_tokens * LAYERS


def test_served_over_http(dense, gguf, cache_dir):
    import openai

    messages = [{"role": "user", "content": "Name a colour."}]
    expected = dense.tokenizer.decode(dense.generate([dense.tokenizer.encode_chat(messages)], GREEDY)[0][1])
    server = ServerProcess("--model", str(gguf), "--cache-dir", str(cache_dir), "--device", "cpu",
                           "--dtype", "float32", "--max-num-seqs", "2", "--max-model-len", "512")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=gguf.name, messages=messages, max_tokens=16, temperature=0)
    finally:
        assert server.stop() == 0
    assert reply.choices[0].message.content == expected and expected
