"""GGUFs of other architectures than the embedded models', as llama.cpp users bring them: Qwen3
(per-head q/k norms, 128-wide heads, a tied embedding), Qwen2 (q/k/v biases, its own lm_head),
Phi-3.5 (fused projections, longrope), Phi-4-mini (Phi-3.5's layout, grouped kv heads, the leading 3/4
of each head rotated) and Gemma 2 (soft-capped attention and logits, sliding windows),
small files with random weights (tests/tiny_gguf.py) whose projections mix quantized formats
within one matrix product, as llama.cpp's Q4_K_M does. transformers' model on the same file,
dequantized, is the reference: the engine's fp32 logits and greedy text equal its, the quantized
kernels come within their activations' rounding, and the mixed projections run in the native
decode step, bit for bit the per-op path."""
from __future__ import annotations

import pytest
import torch

from engine.native import quant_ops
from engine.sampling_params import SamplingParams
from tests.conftest import ServerProcess
from tests.helpers import (assert_gguf_weights_equal_the_dense_conversion, assert_layer_calls_equal_the_per_op_path,
                           hf_greedy, hf_model_of, prefill_logits, run_staggered)
from tests.tiny_gguf import GEMMA2_CAPS, GEMMA2_WINDOW, LAYERS, quantized_tiny_engine, tiny_engine, write_tiny_gguf

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 4, "Once upon a time", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("architectures")


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "phi3", "phi4", "gemma2"])
def gguf(request, cache_dir):
    from engine.loader import embedded_gguf

    return write_tiny_gguf(cache_dir / f"{request.param}.gguf", request.param, embedded_gguf("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def dense(gguf, cache_dir):
    return tiny_engine(gguf, cache_dir, "float32")


@pytest.fixture(scope="module")
def quantized(gguf, cache_dir):
    return quantized_tiny_engine(gguf, cache_dir)


@pytest.fixture(scope="module")
def hf_model(dense):
    return hf_model_of(dense)


@pytest.fixture(scope="module")
def prompts(dense):
    return [dense.tokenizer.encode(text) for text in TEXTS]


def test_quantized_engine_reads_the_file_alone_and_its_weights_equal_the_dense_conversion(gguf, cache_dir, dense):
    """Served on the quantized kernels, a GGUF is read as it is: the engine's cache folder gets its
    config and tokenizer but no dense weights (a 7B file is not expanded to fp32); what it reads
    equals transformers' dense conversion (biases and per-head norms included)."""
    from engine.loader import ensure_hf_dir

    fresh = cache_dir / f"fresh-{gguf.stem}"
    engine = tiny_engine(gguf, fresh, "auto")
    if not engine.runner.quantized:
        pytest.skip("no quantized kernel for this CPU (x86-64-v3 or newer) or no native library")
    assert (engine.hf_dir / "config.json").exists() and (engine.hf_dir / "tokenizer.json").exists()
    assert not list(fresh.rglob("*.safetensors"))
    assert ensure_hf_dir(str(gguf), str(cache_dir)) == dense.hf_dir  # the fp32 engine's folder has them
    weights, _ = assert_gguf_weights_equal_the_dense_conversion(gguf, dense.hf_dir)
    extra = {"qwen3": "model.layers.0.self_attn.k_norm.weight", "qwen2": "model.layers.0.self_attn.v_proj.bias",
             "phi3": "model.layers.0.mlp.gate_up_proj.weight", "phi4": "model.layers.0.self_attn.qkv_proj.weight",
             "gemma2": "model.layers.0.post_feedforward_layernorm.weight"}
    assert extra[gguf.stem] in weights


def test_fp32_logits_and_greedy_text_equal_hf(dense, hf_model, prompts, gguf):
    expected = {"qwen3": "Qwen3Model", "qwen2": "LlamaModel", "phi3": "Phi3Model", "phi4": "Phi3Model",
                "gemma2": "Gemma2Model"}[gguf.stem]
    assert type(dense.runner.model).__name__ == expected
    if gguf.stem in ("phi3", "phi4"):  # longrope's short factors and attention scale, in both models
        assert dense.runner.model.cfg.rope_scaling["rope_type"] == "longrope"
        assert hf_model.config.rope_parameters["rope_type"] == "longrope"
        assert dense.runner.model.ropes["global"].cos[0, 0].item() > 1.1
    if gguf.stem == "phi4":  # the leading 24 of 32 dimensions rotated, in both models, in the native step
        assert dense.runner.model.cfg.rotary_dim == 24 and hf_model.model.rotary_emb.inv_freq.numel() == 12
        assert dense.runner.model.fused_decode is not None
    if gguf.stem == "gemma2":  # the file's caps and window, in both models (small enough here to bind)
        cfg = dense.runner.model.cfg
        caps = (cfg.attn_logit_softcapping, cfg.final_logit_softcapping)
        assert caps == GEMMA2_CAPS and cfg.sliding_window == GEMMA2_WINDOW
        assert (hf_model.config.attn_logit_softcapping, hf_model.config.final_logit_softcapping) == GEMMA2_CAPS
        assert [layer.window for layer in dense.runner.model.layers] == [GEMMA2_WINDOW, None] * (LAYERS // 2)
        assert dense.runner.model.fused_decode is not None  # decode steps soft-cap in the native kernel
    assert dense.runner.model.cfg.head_dim == {"qwen3": 128, "gemma2": 256}.get(gguf.stem, 32)
    for prompt in prompts:
        with torch.inference_mode():
            theirs = hf_model(torch.tensor([prompt])).logits[0].float()
        ours = prefill_logits(dense, prompt)
        assert theirs.abs().max().item() > 1.0  # logits with a spread: the comparison below has teeth
        assert (ours - theirs).abs().max().item() < 1e-3
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    expected_text = [hf_greedy(hf_model, prompt, GREEDY.max_tokens) for prompt in prompts]
    assert len({tuple(t) for t in expected_text}) == len(prompts) and all(len(set(t)) > 3 for t in expected_text)
    assert [dense.generate([p], GREEDY)[0][1] for p in prompts] == expected_text
    assert run_staggered(dense, prompts, GREEDY, join_every=2) == expected_text


def test_a_lora_adapter_on_each_layout_answers_as_the_merged_model(gguf, cache_dir, hf_model, prompts, tmp_path):
    """A PEFT adapter on every projection, by the checkpoint's own module names (Phi-3's fused qkv_proj
    and gate_up_proj; Gemma 2's layers, which are not Llama's), served through engine/lora: within
    fp32 rounding of transformers' model with it merged, in prefill and over a decoded answer."""
    from tests.lora_files import ATTENTION, FUSED, MLP, merged_model, write_adapter

    engine = tiny_engine(gguf, cache_dir, "float32", enable_lora=True)
    modules = FUSED if gguf.stem in ("phi3", "phi4") else ATTENTION + MLP
    folder = write_adapter(tmp_path / "adapter", engine.model_config, modules=modules, rank=4, std=0.2)
    engine.lora.load("t", str(folder))
    merged = merged_model(hf_model, folder)
    for prompt in prompts[1:]:
        tokens = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, adapter="t"))[0][1]
        with torch.inference_mode():
            theirs = merged(torch.tensor([prompt + tokens])).logits[0].float()
            base = hf_model(torch.tensor([prompt + tokens])).logits[0].float()
        assert (theirs - base).abs().max().item() > 0.5  # the adapter matters
        with engine.kv_blocks([len(prompt)]) as (table,):
            ours = engine.runner.logits(engine.runner.prefill([(prompt, table, 0)], adapters=[engine.lora.slots["t"]]))
        assert (ours - theirs[:len(prompt)]).abs().max().item() < 1e-3
        decoded = theirs[len(prompt) - 1:-1]
        assert (decoded.max(-1).values - decoded.gather(1, torch.tensor(tokens)[:, None])[:, 0]).max() < 1e-3


def test_quantized_weights_mixing_formats_in_a_projection_run_in_the_native_step(quantized, dense, prompts, gguf):
    """q|k|v and gate|up hold row blocks of two layouts (4-bit with offsets, 8-bit without): each
    block on its own kernel, inside the one-call decode step; logits within the int16 rounding of
    the activations (see tests/test_quantized_model.py) of the fp32 model on the same file: these
    logits are of O(1), and this host measures ~0.002. Qwen2's and Phi-4-mini's files hold Q2_K,
    Q3_K, IQ4_NL and IQ4_XS matrices too, on the quantized kernels like the rest."""
    model = quantized.runner.model
    assert model.fused_decode is not None
    low_bits = {"qwen2": {"Q2_K", "Q3_K", "IQ4_NL"}, "phi4": {"IQ4_XS"}}.get(gguf.stem, set())
    assert low_bits <= {part for name in model.weight_formats() for part in name.split("+")}
    assert {lin.backend.split("+")[0] for layer in model.layers
            for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)} == {f"quant-{quant_ops.best_isa()}"}
    fused = type(model).__name__ == "Phi3Model"  # q|k|v and gate|up are one tensor each in the file
    assert any(hasattr(layer.qkv, "parts") for layer in model.layers) != fused
    assert any(hasattr(layer.gate_up, "parts") for layer in model.layers) != fused
    tolerance = 0.01
    for prompt in prompts:
        text = prompt + dense.generate([prompt], GREEDY)[0][1]
        ours, reference = prefill_logits(quantized, text), prefill_logits(dense, text)
        assert (ours - reference).abs().max().item() < tolerance
        top2 = reference.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
        assert clear.float().mean() > 0.8
        assert torch.equal(ours.argmax(-1)[clear], reference.argmax(-1)[clear])


def test_native_layer_calls_equal_the_per_op_path(quantized, prompts):
    assert_layer_calls_equal_the_per_op_path(quantized, prompts, skips=LAYERS - 2)


def test_served_over_http_with_its_chat_template(dense, gguf, cache_dir):
    """`skipserve --model FILE.gguf` serves it under the file's name: a greedy chat answer is the
    in-process engine's text for the templated prompt; a completion with a `suffix` fills in the
    middle through the file's FIM tokens (prefix, suffix, middle order), as the engine does for
    that prompt."""
    import httpx
    import openai

    from server.fill_in_middle import fim_ends, fim_prompt, fim_tokens, leading_specials

    tok = dense.tokenizer
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt = tok.encode_chat(messages)
    expected = tok.decode(dense.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0][1])
    before, after = "def add(a, b):\n    return", "\n\nprint(add(1, 2))\n"
    pre, suf, mid = fim_tokens(tok)
    assert [tok.token_text(i) for i in (pre, suf, mid)] == ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    assert leading_specials(tok) == []  # SmolLM2's tokenizer adds no BOS
    infill = fim_prompt([], (pre, suf, mid), tok.encode(before, False), tok.encode(after, False))
    assert infill == [pre, *tok.encode(before, False), suf, *tok.encode(after, False), mid]
    ends = fim_ends(tok)
    assert ends == [tok.token_id("<|endoftext|>"), tok.token_id("<file_sep>")]  # SmolLM2's, StarCoder's spelling
    middle = tok.decode(dense.generate([infill], SamplingParams(temperature=0.0, max_tokens=8,
                                                                stop_token_ids=ends))[0][1])
    server = ServerProcess("--model", str(gguf), "--cache-dir", str(cache_dir), "--device", "cpu",
                           "--dtype", "float32", "--max-num-seqs", "2", "--max-model-len", "512")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [gguf.name]
        reply = client.chat.completions.create(model=gguf.name, messages=messages, max_tokens=12, temperature=0)
        filled = client.completions.create(model=gguf.name, prompt=before, suffix=after, max_tokens=8, temperature=0)
        # llama.cpp's /infill: the same prompt, the same middle; a start of the middle goes after FIM_MID
        native = httpx.post(server.url + "/infill", timeout=120, json={
            "input_prefix": before, "input_suffix": after, "n_predict": 8, "temperature": 0}).json()
        started = httpx.post(server.url + "/infill", timeout=120, json={
            "input_prefix": before, "input_suffix": after, "prompt": " a", "n_predict": 2, "temperature": 0,
            "input_extra": [{"filename": "util.py", "text": "X = 1\n"}]}).json()
    finally:
        assert server.stop() == 0
    assert reply.choices[0].message.content == expected and expected
    assert reply.usage.prompt_tokens == len(prompt)
    assert filled.choices[0].text == middle and middle and filled.usage.prompt_tokens == len(infill)
    assert native["content"] == middle and native["tokens_evaluated"] == len(infill)
    extra = tok.encode("X = 1\n", False)  # (no repo-level tokens in this vocabulary: the text goes first)
    assert started["tokens_evaluated"] == len(extra) + len(infill) + len(tok.encode(" a", False))


def test_longrope_tables_equal_transformers_on_either_side_of_the_pretrained_length():
    """Phi-3's longrope: the short factors while the server's longest sequence is within the
    pretrained length, the long ones past it (as transformers picks for such a sequence), and
    transformers' attention scale."""
    import math

    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.models.rope import attention_factor, inverse_frequencies

    short, long = [1.0 + i / 16 for i in range(16)], [2.0 + i for i in range(16)]
    raw = dict(model_type="phi3", vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
               num_attention_heads=4, max_position_embeddings=131072, original_max_position_embeddings=4096,
               rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})
    hf = Phi3Config(**{k: v for k, v in raw.items() if k != "model_type"})
    ours = _read_config(raw)
    for max_len, seq_len in ((4096, 4096), (8192, 4097)):
        theirs, scale = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", seq_len=seq_len)
        mine = inverse_frequencies(32, ours.rope_theta, ours.rope_scaling, max_len).float()
        assert torch.allclose(mine, theirs, rtol=1e-6), max_len
        assert math.isclose(attention_factor(ours.rope_scaling), scale, rel_tol=1e-9)
    assert attention_factor(ours.rope_scaling) > 1.1


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
     "original_max_position_embeddings": 4096},  # gpt-oss's
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen3's long-context advice
    {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 16.0,
     "original_max_position_embeddings": 4096},
])
def test_yarn_tables_equal_transformers(scaling):
    """YaRN's frequencies (ramp ends rounded or not) and cos/sin scale, as transformers computes them."""
    import math

    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.models.rope import attention_factor, inverse_frequencies

    raw = dict(model_type="gpt_oss", vocab_size=100, hidden_size=256, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
               max_position_embeddings=int(scaling["factor"] * scaling["original_max_position_embeddings"]),
               rope_parameters={**scaling, "rope_theta": 150000.0})
    hf = GptOssConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    theirs, scale = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = _read_config(raw)
    mine = inverse_frequencies(64, ours.rope_theta, ours.rope_scaling).float()
    assert torch.allclose(mine, theirs, rtol=1e-6) and not torch.allclose(mine, inverse_frequencies(64, 150000.0, None).float())
    assert math.isclose(attention_factor(ours.rope_scaling), scale, rel_tol=1e-9)


def _read_config(raw: dict):
    import json
    import tempfile
    from pathlib import Path

    from engine.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(raw))
        return ModelConfig.from_hf_dir(tmp)


def test_end_of_turn_tokens_end_generations():
    """The GGUF's eot id and its special tokens spelled as chat turns end (llama.cpp's end-of-
    generation set) join the config's eos: Phi-3's files say <|endoftext|>, its turns end <|end|>."""
    from engine.loader import end_of_generation_ids

    class Token:
        def __init__(self, content, special):
            self.content, self.special = content, special

    class Tok:
        added_tokens_decoder = {5: Token("<|end|>", True), 6: Token("<|im_end|>", False), 7: Token("<|endoftext|>", True)}

    assert end_of_generation_ids({"tokenizer.ggml.eot_token_id": 9}, Tok(), 7) == [7, 9, 5]
    assert end_of_generation_ids({}, Tok(), [7, 5]) == [7, 5]


def test_a_gguf_that_rotates_part_of_each_head_says_so_by_its_rotary_width():
    """Phi-4-mini's file says so by its rotary width (transformers' config does not): the config
    written from it carries the share, and the engine's config the rotated width."""
    import json
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    from transformers import Phi3Config

    from engine.loader import complete_config
    from engine.models import check_architecture

    config = Phi3Config(hidden_size=3072, num_attention_heads=24, num_hidden_layers=1, vocab_size=100)
    complete_config(config, SimpleNamespace(fields={"general.architecture": "phi3", "phi3.rope.dimension_count": 96},
                                            tensors=[]))
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        raw = json.loads((Path(tmp) / "config.json").read_text())
    ours = _read_config(raw)
    check_architecture(ours)
    assert (ours.partial_rotary_factor, ours.rotary_dim, ours.head_dim) == (0.75, 96, 128)
    with pytest.raises(ValueError, match="even number"):
        _read_config({**raw, "partial_rotary_factor": 0.7, "rope_parameters": {}})


def test_a_mixture_of_experts_with_dense_layers_or_impossible_expert_counts_is_refused():
    from engine.models import check_architecture

    moe = dict(model_type="qwen3_moe", vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    check_architecture(_read_config(moe))
    with pytest.raises(ValueError, match="dense layers"):
        check_architecture(_read_config({**moe, "mlp_only_layers": [0]}))
    for used, experts in ((5, 4), (0, 4)):  # a file's counts the routing cannot take: refused at start
        with pytest.raises(ValueError, match="used <= experts"):
            check_architecture(_read_config({**moe, "num_experts_per_tok": used, "num_experts": experts}))


def test_an_unsupported_architecture_is_named_not_a_missing_key():
    """GPT-2's config has `n_embd`, not `hidden_size`: reading it failed with KeyError: 'hidden_size'."""
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        _read_config(dict(model_type="gpt2", vocab_size=100, n_embd=64, n_layer=2, n_head=4))


@pytest.mark.parametrize("layers, hidden, heads, head_dim, scalar", [(26, 2304, 8, 256, 256), (46, 4608, 32, 128, 144)])
def test_gemma2_query_scale_follows_llamacpp_as_the_file_has_none(layers, hidden, heads, head_dim, scalar):
    """Gemma 2 2B/9B scale queries by head_dim, 27B (46 layers) by hidden / heads; the caps come from
    the file, where transformers' reader keeps its defaults."""
    from types import SimpleNamespace

    from transformers import Gemma2Config

    from engine.loader import complete_config

    config = Gemma2Config(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim)
    fields = {"general.architecture": "gemma2", "gemma2.attn_logit_softcapping": 20.0,
              "gemma2.final_logit_softcapping": 10.0, "gemma2.attention.key_length": head_dim}
    complete_config(config, SimpleNamespace(fields=fields, tensors=[]))
    assert config.query_pre_attn_scalar == scalar
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (20.0, 10.0)


def test_a_gemma2_config_without_layer_types_alternates_sliding_and_full_layers():
    """Google's Gemma 2 config.json files name neither layer_types nor a pattern: transformers
    alternates them, sliding first."""
    raw = dict(model_type="gemma2", vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
               num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=4096)
    assert _read_config(raw).layer_types == ["sliding_attention", "full_attention"] * 2
    assert _read_config({**raw, "model_type": "llama"}).layer_types is None
