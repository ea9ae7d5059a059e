"""A mixture-of-experts GGUF (Qwen3-MoE's layout: Qwen3's attention, a router and SwiGLU experts,
each expert kind one [experts, rows, columns] tensor in the file), small with random weights
(tests/tiny_gguf.py: 4 experts, 2 a token). transformers' model on the same file, dequantized, is
the reference: fp32 logits and greedy text alone and in a staggered batch; the quantized experts
within their activations' rounding; FFN skips over the whole mixture; a served chat answer."""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig, SkipConfig
from engine.sampling_params import SamplingParams, SkipParams
from tests.conftest import ServerProcess
from tests.helpers import hf_greedy, run_staggered
from tests.tiny_gguf import EXPERTS, LAYERS, USED, write_tiny_gguf

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 4, "Once upon a time", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe")


@pytest.fixture(scope="module")
def gguf(cache_dir):
    from engine.loader import embedded_gguf

    return write_tiny_gguf(cache_dir / "qwen3moe.gguf", "qwen3moe", embedded_gguf("smollm2-135m-instruct"))


def engine(gguf, cache_dir, dtype: str):
    from engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(gguf), device="cpu", dtype=dtype, max_num_seqs=4, max_model_len=512,
                                  cache_dir=str(cache_dir), skip=SkipConfig(cold_start=1, cold_end=1)))


@pytest.fixture(scope="module")
def dense(gguf, cache_dir):
    return engine(gguf, cache_dir, "float32")


@pytest.fixture(scope="module")
def hf_model(dense):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(dense.hf_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(dense):
    return [dense.tokenizer.encode(text) for text in TEXTS]


def prefill_logits(engine, prompt: list[int]) -> torch.Tensor:
    runner = engine.runner
    with engine.kv_blocks([len(prompt)]) as (table,):
        return runner.logits(runner.prefill([(prompt, table, 0)]))


def test_fp32_logits_and_greedy_text_equal_hf(dense, hf_model, prompts):
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


def test_every_expert_is_routed_to_and_the_router_picks_as_transformers(dense, hf_model, prompts):
    """The prompts reach every expert of a layer (the test covers them all), and per token the
    engine's chosen experts are transformers'."""
    layer, hf_layer = dense.runner.model.layers[1], hf_model.model.layers[1]
    x = torch.randn(64, dense.runner.model.cfg.hidden_size)
    with torch.inference_mode():
        _, _, theirs = hf_layer.mlp.gate(x)
        ours = torch.softmax(layer.router(x).float(), dim=-1).topk(USED, dim=-1).indices
    assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values)
    assert set(ours.flatten().tolist()) == set(range(EXPERTS))


def test_quantized_experts_come_within_rounding_of_fp32(gguf, cache_dir, dense, prompts):
    quantized = engine(gguf, cache_dir, "auto")
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
