"""gpt-oss from a GGUF as llama.cpp's converter writes it (tests/tiny_gguf.py: biases on q, k, v and o,
per-head attention sinks, a 16-token window on the even layers, YaRN, a router with a bias, MXFP4
experts with biases), small with random weights. The reference is transformers' GptOssForCausalLM
on the file's tensors, dequantized by gguf-py and laid out here as transformers keeps them
(experts [experts, in, out], gate and up interleaved): its own reader loads no expert of such a
file, and this mapping is written apart from the engine's, so it checks the engine's too."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.helpers import (assert_layer_calls_equal_the_per_op_path, assert_quantized_close_and_skipping,
                           assert_served_chat_is_the_engines, hf_greedy, prefill_logits, run_staggered,
                           saved_checkpoint_engine)
from tests.tiny_gguf import EXPERTS, GPT_OSS_WINDOW, LAYERS, USED, quantized_tiny_engine, tiny_engine, write_tiny_gguf

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
# the first longer than the window (16) and than the prompts' positions YaRN leaves unscaled
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 4, "Once upon a time", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpt_oss")


@pytest.fixture(scope="module")
def gguf(cache_dir):
    from engine.loader import embedded_gguf

    return write_tiny_gguf(cache_dir / "gpt-oss.gguf", "gpt-oss", embedded_gguf("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def dense(gguf, cache_dir):
    return tiny_engine(gguf, cache_dir, "float32")


@pytest.fixture(scope="module")
def quantized(gguf, cache_dir):
    return quantized_tiny_engine(gguf, cache_dir)


def transformers_state(gguf) -> dict:
    """The file's tensors under transformers' gpt-oss names and layouts."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    top = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
           "output_norm.weight": "model.norm.weight"}
    own = {"attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
           "attn_sinks.weight": "self_attn.sinks", "ffn_gate_inp.weight": "mlp.router.weight",
           "ffn_gate_inp.bias": "mlp.router.bias"}
    own.update({f"attn_{a}.{kind}": f"self_attn.{b}_proj.{kind}" for a, b in
                (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for kind in ("weight", "bias")})
    tensors = {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
               .reshape([int(d) for d in reversed(t.shape)]) for t in GGUFReader(str(gguf)).tensors}
    state = {hf: tensors[name] for name, hf in top.items()}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        state.update({layer + hf: tensors[f"blk.{i}.{name}"] for name, hf in own.items()})
        gate, up = tensors[f"blk.{i}.ffn_gate_exps.weight"], tensors[f"blk.{i}.ffn_up_exps.weight"]  # [E, out, in]
        gate_up = torch.stack([gate, up], dim=-2).flatten(1, 2)  # rows gate 0, up 0, gate 1, ...
        state[layer + "mlp.experts.gate_up_proj"] = gate_up.transpose(1, 2).contiguous()  # [E, in, 2 * out]
        state[layer + "mlp.experts.gate_up_proj_bias"] = torch.stack(
            [tensors[f"blk.{i}.ffn_gate_exps.bias"], tensors[f"blk.{i}.ffn_up_exps.bias"]], dim=-1).flatten(1)
        state[layer + "mlp.experts.down_proj"] = tensors[f"blk.{i}.ffn_down_exps.weight"].transpose(1, 2).contiguous()
        state[layer + "mlp.experts.down_proj_bias"] = tensors[f"blk.{i}.ffn_down_exps.bias"]
    return state


@pytest.fixture(scope="module")
def reference(dense, gguf):
    """transformers' model (the engine's config) on the file's tensors, and the prompts as token ids."""
    from transformers import AutoConfig, GptOssForCausalLM

    config = AutoConfig.from_pretrained(str(dense.hf_dir))
    config._attn_implementation = "eager"  # the implementation with sinks
    model = GptOssForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(transformers_state(gguf), strict=False)
    assert not unexpected and not missing
    return model, [dense.tokenizer.encode(text) for text in TEXTS]


def test_the_config_reads_what_transformers_misreads(dense):
    cfg = dense.runner.model.cfg
    assert cfg.model_type == "gpt_oss" and (cfg.num_experts, cfg.num_experts_per_tok) == (EXPERTS, USED)
    assert cfg.head_dim == 48 and cfg.head_dim * cfg.num_heads != cfg.hidden_size
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 32.0
    assert [layer.window for layer in dense.runner.model.layers] == [GPT_OSS_WINDOW, None] * (LAYERS // 2)


def test_fp32_logits_and_greedy_text_equal_hf(dense, reference):
    hf_model, prompts = reference
    assert dense.runner.model.fused_decode is not None  # decode steps in native layer calls
    assert len(prompts[0]) > 2 * GPT_OSS_WINDOW
    for prompt in prompts:
        with torch.inference_mode():
            theirs = hf_model(torch.tensor([prompt])).logits[0].float()
        ours = prefill_logits(dense, prompt)
        assert theirs.abs().max().item() > 1.0
        assert (ours - theirs).abs().max().item() < 1e-3
    expected = [hf_greedy(hf_model, prompt, GREEDY.max_tokens) for prompt in prompts]
    assert [dense.generate([p], GREEDY)[0][1] for p in prompts] == expected
    assert run_staggered(dense, prompts, GREEDY, join_every=2) == expected


def test_sinks_take_their_share_of_each_softmax(dense, reference):
    """The same model with its sinks at -inf (no share) answers differently: the sinks are read."""
    hf_model, prompts = reference
    layers = dense.runner.model.layers
    saved = [layer.sinks.clone() for layer in layers]
    try:
        for layer in layers:
            layer.sinks.fill_(-float("inf"))
        without = prefill_logits(dense, prompts[1])
    finally:
        for layer, sinks in zip(layers, saved):
            layer.sinks.copy_(sinks)
    assert (without - prefill_logits(dense, prompts[1])).abs().max().item() > 0.1


def test_mxfp4_experts_on_the_quantized_kernels_come_within_rounding_of_fp32(quantized, dense, reference):
    prompts = reference[1]
    gate_up = quantized.runner.model.layers[0].experts[0][0]
    assert gate_up.backend.startswith("quant-") and gate_up.format == "MXFP4"
    assert gate_up.weight.bits == 4 and gate_up.weight.table is not None  # its nibbles kept: 4 bits a weight
    assert_quantized_close_and_skipping(quantized, dense, prompts, GREEDY, LAYERS)


@pytest.mark.parametrize("weights", ["float32", "quantized"])
def test_native_layer_calls_equal_the_per_op_path(request, reference, weights):
    """gpt-oss's decode steps in native layer calls (decode_layers.cpp: the biases in the projections'
    descriptors, the sinks passed to the native decode attention, the windowed even layers; the FFN in
    routed_experts.cpp: softmax over the chosen logits, the experts' biases, the clamped SwiGLU)
    against the per-op path, dense and skipping, on fp32 and MXFP4 weights. Within rounding (the
    native code computes the routing softmax and the SwiGLU's sigmoid itself)."""
    engine = request.getfixturevalue("dense" if weights == "float32" else "quantized")
    prompts = reference[1]
    assert engine.runner.model.fused_decode is not None and len(prompts[0]) > 2 * GPT_OSS_WINDOW
    assert_layer_calls_equal_the_per_op_path(engine, prompts, skips=LAYERS - 2, tolerance=1e-3)


def test_the_native_ffn_clamps_as_the_per_op_path(dense):
    """With a SwiGLU limit low enough to bind (the file's 7 does not on these random weights), each
    layer's FFN branch in native code (routed_experts.cpp) gives the per-op path's `ffn`, and
    differs from the unclamped one's: the clamp is applied, on gate and on up."""
    from engine.backends.cpu.fused_decode import LAYER_COLUMNS, REF_COLUMNS, TAIL_COLUMNS

    model = dense.runner.model
    fused, cfg = model.fused_decode, model.cfg
    tables = {t.data_ptr(): t for t in fused.part_tables}
    at = LAYER_COLUMNS + 4 * REF_COLUMNS + TAIL_COLUMNS.index("swiglu")
    params = {tables[int(fused.table[i, at])].data_ptr(): tables[int(fused.table[i, at])] for i in range(LAYERS)}
    h = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    unclamped = [layer.ffn(h) for layer in model.layers]
    saved = cfg.swiglu_limit
    try:
        for limit in (0.05, 0.2):
            cfg.swiglu_limit = limit  # the per-op path reads it at each call, the native table holds a copy
            for p in params.values():
                p[0] = limit
            for i, layer in enumerate(model.layers):
                ours, theirs = fused.ffn_branch(i, h), layer.ffn(h)
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
                assert (theirs - unclamped[i]).abs().max().item() > 1e-3
    finally:
        cfg.swiglu_limit = saved
        for p in params.values():
            p[0] = saved


def test_an_int8_cache_is_refused_for_heads_of_48(gguf, cache_dir):
    """int8 rows take a scale per 32 values: a head of 48 has none that fit, refused at start."""
    with pytest.raises(ValueError, match="multiple of 32 values; this model's have 48"):
        tiny_engine(gguf, cache_dir, "float32", kv_cache_dtype="int8")


def test_served_over_http(dense, gguf, cache_dir):
    assert_served_chat_is_the_engines(dense, gguf, cache_dir)


def test_a_transformers_checkpoint_serves_the_same_model(dense, reference, tmp_path):
    """A folder in transformers' layout (a bf16 gpt-oss checkpoint's: experts [experts, in, out],
    gate and up interleaved) serves the GGUF's logits; one whose config names a quantization (the
    hub's gpt-oss is MXFP4 safetensors) is refused by name at start."""
    import json

    from engine.llm_engine import LLMEngine

    hf_model, prompts = reference
    folder = tmp_path / "checkpoint"
    engine, config = saved_checkpoint_engine(hf_model, dense, folder)
    assert engine.runner.model.layers[0].experts[0][0].out_features == 2 * engine.runner.model.cfg.intermediate_size
    for prompt in prompts:
        assert (prefill_logits(engine, prompt) - prefill_logits(dense, prompt)).abs().max().item() < 1e-4
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(ValueError, match="quantized by 'mxfp4'"):
        LLMEngine(config)
