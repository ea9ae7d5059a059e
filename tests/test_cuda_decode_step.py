"""The CUDA backend's decode step (engine/backends/cuda/decode_step.py) on the real embedded model's
first layers, run on the CPU under Triton's interpreter with fp32 weights, against the torch backend's decode
path on the same weights and cache: same hidden states, greedy tokens, K/V and exact skip counts.
On a CUDA host the step runs compiled, in the engine (tests/test_cuda.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kernel_device import INTERPRETED

from engine.backends.cuda import tile_tuning  # noqa: E402
from engine.backends.cuda.decode_step import DecodeStep  # noqa: E402
from engine.backends.cuda.masked_linear import tuning_key  # noqa: E402
from engine.backends.torch_backend import TorchBackend  # noqa: E402
from engine.config import ModelConfig, SkipConfig  # noqa: E402
from engine.kv.cache import KVCache  # noqa: E402
from engine.kv.metadata import AttentionMetadata  # noqa: E402
from engine.loader import load_state_dict  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.skip import DenseGate, RowSkip, build_policy  # noqa: E402
from engine.skip.calibration import RecordingGate  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="the step on CPU tensors needs Triton's interpreter; "
                                "on CUDA it runs compiled in tests/test_cuda.py")

BLOCK_SIZE, NUM_BLOCKS, MAX_LEN = 16, 8, 128
# Three rows whose first decode positions sit at block edges: 15 (the last slot of block 5), 16
# (the first slot of block 6) and 37 (in block 7); the second step moves each one on. The tables
# are shuffled and block 4 belongs to no row.
TABLES = [[5, 2], [1, 6], [3, 0, 7]]
PROMPT_LENGTHS = [16, 17, 38]
# Everything is fp32 on both sides; only the order of summation differs (Triton's blocked dot
# products and online softmax vs torch's GEMMs and gathered softmax). Measured on these rows: at
# most 2.1e-5 apart on hidden states up to 27 in magnitude (2e-6 of a row's norm). 1e-3 leaves ~50x
# for other BLAS builds and still fails on any real fault: a wrong row, block, position or skipped
# FFN moves the hidden states by O(1).
TOLERANCE = dict(atol=1e-3, rtol=1e-3)
# of the embedded model's 30: the interpreter's time goes as the layers; 4 cold at each end (the
# preset's skip settings) leave 4 hot ones
LAYERS = 12


@pytest.fixture(scope="module")
def torch_model(engine):
    """The embedded model's first LAYERS layers in fp32 on the torch backend (dense PlainLinear
    projections, as CUDA loads them), and a small KV cache of its own."""
    cfg = dataclasses.replace(engine.model_config, num_layers=LAYERS)
    model = build_model(cfg, load_state_dict(engine.hf_dir), "cpu", torch.float32, MAX_LEN, TorchBackend())
    kv = KVCache(cfg.num_layers, NUM_BLOCKS, cfg.num_kv_heads, BLOCK_SIZE, cfg.head_dim, "cpu", torch.float32)
    return model, kv


def decode_steps(decode, prompts, gates):
    """Greedy decode steps from each prompt's last token, one per gate, through `decode(tokens,
    positions, gate)` -> (hidden, tokens, skip counts) per step."""
    tokens, positions, steps = [p[-1] for p in prompts], [len(p) - 1 for p in prompts], []
    for make_gate in gates:
        gate = make_gate()
        hidden, logits = decode(tokens, positions, gate)
        tokens = logits.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
        steps.append((hidden, tokens, gate.skip_counts(len(prompts))))
    return steps


def assert_step_decodes_as_the_torch_backend(model, kv, step, prompts, gates):
    """The prompts prefilled but for their last token on the torch backend, then one decode step
    per gate through the torch backend and, from the same cache, through `step`: same hidden
    states, greedy tokens, skip counts and K/V -> (the torch backend's steps, the prefilled K)."""
    with torch.inference_mode():
        kv.k.zero_()
        kv.v.zero_()
        meta = AttentionMetadata.for_prefill([(t, 0, len(p) - 1) for t, p in zip(TABLES, prompts)], BLOCK_SIZE, "cpu")
        model.forward(torch.tensor([t for p in prompts for t in p[:-1]]), meta, kv, DenseGate(model.cfg.num_layers))
        k_prefilled, v_prefilled = kv.k.clone(), kv.v.clone()

        def torch_decode(tokens, positions, gate):
            meta = AttentionMetadata.for_decode(TABLES, positions, BLOCK_SIZE, "cpu", torch.float32)
            hidden = model.forward(torch.tensor(tokens), meta, kv, gate)
            return hidden, model.logits(hidden)

        def step_decode(tokens, positions, gate):
            assert step.takes(len(tokens), TABLES, gate)
            hidden = step(tokens, positions, TABLES, gate).clone()  # the step's buffer is reused
            return hidden, model.logits(hidden)

        expected = decode_steps(torch_decode, prompts, gates)
        k_expected, v_expected = kv.k.clone(), kv.v.clone()
        kv.k.copy_(k_prefilled)
        kv.v.copy_(v_prefilled)
        got = decode_steps(step_decode, prompts, gates)

    for (hidden, tokens, counts), (hidden_ref, tokens_ref, counts_ref) in zip(got, expected):
        torch.testing.assert_close(hidden, hidden_ref, **TOLERANCE)
        assert tokens == tokens_ref
        assert counts == counts_ref
    torch.testing.assert_close(kv.k, k_expected, **TOLERANCE)
    torch.testing.assert_close(kv.v, v_expected, **TOLERANCE)
    return expected, k_prefilled


def dense_products_on(step, rows: int, masked: bool, monkeypatch) -> None:
    """Dense steps of `rows` rows run the FFN's products on the masked kernels, as where those ran
    faster than cuBLAS at start (tile_tuning's reports), or on torch's linear (cuBLAS on a GPU:
    until something is measured)."""
    ffn = step.ffns[0]
    if masked:
        monkeypatch.setattr(tile_tuning, "_reports", {tuning_key(w, rows, act): dict(ms=1.0, cublas_ms=2.0)
                                                      for w, act in ((ffn.gate_up_weight, None),
                                                                     (ffn.down_weight, ffn.activation))})
    assert tile_tuning.prefer_masked(ffn.down_weight, rows, ffn.activation) == masked


def test_decode_step_equals_the_torch_backends_decode(engine, chat_prompts, torch_model, monkeypatch):
    """Dense steps on torch's linear layers (cuBLAS on a GPU; on the masked kernels, as where those
    ran the FFN's products faster at start: the random Qwen3 and Gemma 3 below)."""
    model, kv = torch_model
    base = chat_prompts[0] * 3
    prompts = [base[:n] for n in PROMPT_LENGTHS]
    policy = build_policy(engine.config.skip, model.cfg.num_layers)
    # row 0 is forced to skip its 4 hot layers' FFNs (it fires at the first); rows 1 and 2 have budget 0
    skipping = [RowSkip(4, -1.0), RowSkip(0, -1.0), RowSkip(0, -1.0)]
    gates = [lambda: DenseGate(model.cfg.num_layers), lambda: policy.make_gate(skipping, "cpu")]
    step = DecodeStep(model, kv, max_batch=4, max_blocks=4, skip=engine.config.skip, quorum=policy.quorum)
    assert DecodeStep.fits(model, kv)
    dense_products_on(step, len(prompts), False, monkeypatch)

    expected, k_prefilled = assert_step_decodes_as_the_torch_backend(model, kv, step, prompts, gates)
    assert expected[1][2][0] == [4, 0, 0]  # the second step did skip, in row 0 only
    written = (kv.k != k_prefilled).flatten(2).any(-1).any(0)  # per block: did a step write into it
    assert written.tolist() == [False, False, True, False, False, True, True, True]  # blocks 2, 5, 6, 7


def test_the_step_takes_only_rows_its_buffers_hold_and_rules_its_gate_runs(engine, torch_model):
    model, kv = torch_model
    policy = build_policy(engine.config.skip, model.cfg.num_layers)
    step = DecodeStep(model, kv, max_batch=2, max_blocks=4, skip=engine.config.skip, quorum=policy.quorum)
    rule = policy.make_gate([RowSkip(4, 0.9)], "cpu")
    assert step.takes(1, [[0, 1]], rule) and step.takes(2, [[0], [1]], DenseGate(model.cfg.num_layers))
    assert not step.takes(3, [[0]] * 3, rule)  # more rows than its buffers hold
    assert not step.takes(1, [[0] * 5], rule)  # a longer block table
    assert not step.takes(1, [[0]], RecordingGate(model.cfg.num_layers))  # a gate that acts in Python
    aligned = build_policy(SkipConfig(policy="batch_aligned"), model.cfg.num_layers)
    assert not step.takes(1, [[0]], aligned.make_gate([RowSkip(4, 0.9)], "cpu"))  # another rule


@pytest.mark.parametrize("skip", [SkipConfig(policy="none"), SkipConfig(max_budget=0.0),
                                  SkipConfig(cold_start=16, cold_end=16)], ids=["none", "no-budget", "all-cold"])
def test_a_policy_that_never_skips_gets_no_gated_step(engine, torch_model, skip):
    """No gated variant is built (nor captured as graphs on a GPU) where no row may ever skip."""
    model, kv = torch_model
    policy = build_policy(skip, model.cfg.num_layers)
    assert not policy.may_skip and build_policy(engine.config.skip, model.cfg.num_layers).may_skip
    step = DecodeStep(model, kv, max_batch=2, max_blocks=4, skip=skip, quorum=policy.quorum,
                           may_skip=policy.may_skip)
    assert list(step.graphs.forwards) == ["dense"]
    rule = build_policy(engine.config.skip, model.cfg.num_layers).make_gate([RowSkip(4, 0.9)], "cpu")
    assert step.takes(1, [[0]], DenseGate(model.cfg.num_layers)) and not step.takes(1, [[0]], rule)


GEMMA_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def random_model(generator: torch.Generator, model_type: str, **config):
    """A small model of `model_type` (heads wider than hidden / heads; Qwen3's and Gemma 3's
    per-head q/k norms, Gemma's four norms a layer; `config`: more ModelConfig fields) with random
    fp32 weights on the torch backend, and a KV cache of its own."""
    cfg = ModelConfig(model_type=model_type, vocab_size=512, hidden_size=96, intermediate_size=160, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
                      max_position_embeddings=MAX_LEN, tie_word_embeddings=True, eos_token_ids=[0],
                      **{"rope_scaling": None, **config})
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size

    gemma = model_type.startswith("gemma")
    norm_mean = 0.0 if gemma else 1.0  # Gemma scales by (1 + w)

    def weight(*shape, mean=0.0):
        return mean + torch.randn(*shape, generator=generator) * (shape[-1] ** -0.5 if len(shape) == 2 else 0.2)

    state = {"model.embed_tokens.weight": weight(cfg.vocab_size, h), "model.norm.weight": weight(h, mean=norm_mean)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": weight(h, mean=norm_mean),
                  p + "post_attention_layernorm.weight": weight(h, mean=norm_mean),
                  p + "self_attn.q_proj.weight": weight(cfg.num_heads * d, h),
                  p + "self_attn.k_proj.weight": weight(cfg.num_kv_heads * d, h),
                  p + "self_attn.v_proj.weight": weight(cfg.num_kv_heads * d, h),
                  p + "self_attn.o_proj.weight": weight(h, cfg.num_heads * d)}
        if cfg.num_experts:  # a router and experts, one matrix each (as engine/gguf_weights.py splits a GGUF's)
            width = cfg.moe_intermediate_size
            for e in range(cfg.num_experts):
                state |= {f"{p}mlp.experts.{e}.{part}_proj.weight": weight(*shape)
                          for part, shape in (("gate", (width, h)), ("up", (width, h)), ("down", (h, width)))}
            state[p + ("mlp.router.weight" if model_type == "gpt_oss" else "mlp.gate.weight")] = \
                weight(cfg.num_experts, h) * 4  # routing weights well apart
        else:
            state |= {p + "mlp.gate_proj.weight": weight(inter, h), p + "mlp.up_proj.weight": weight(inter, h),
                      p + "mlp.down_proj.weight": weight(h, inter)}
        if model_type == "gpt_oss":  # biases on every projection, the router's, the experts'; a sink per head
            state |= {f"{p}self_attn.{name}_proj.bias": weight(size) for name, size in
                      (("q", cfg.num_heads * d), ("k", cfg.num_kv_heads * d), ("v", cfg.num_kv_heads * d), ("o", h))}
            state |= {p + "mlp.router.bias": weight(cfg.num_experts), p + "self_attn.sinks": weight(cfg.num_heads)}
            for e in range(cfg.num_experts):
                state |= {f"{p}mlp.experts.{e}.{part}_proj.bias": weight(size) for part, size in
                          (("gate", cfg.moe_intermediate_size), ("up", cfg.moe_intermediate_size), ("down", h))}
        if model_type in ("qwen3", "gemma3_text", "qwen3_moe"):
            state |= {p + "self_attn.q_norm.weight": weight(d, mean=norm_mean),
                      p + "self_attn.k_norm.weight": weight(d, mean=norm_mean)}
        if gemma:
            state |= {p + f"{name}.weight": weight(h) for name in GEMMA_NORMS}
    model = build_model(cfg, state, "cpu", torch.float32, MAX_LEN, TorchBackend())
    kv = KVCache(cfg.num_layers, NUM_BLOCKS, cfg.num_kv_heads, BLOCK_SIZE, cfg.head_dim, "cpu", torch.float32)
    return model, kv


def hot_layer_step(model, kv, generator: torch.Generator, forced: list[int]):
    """A step of `model` whose hot layers are 1 and 2 of 4, three prompts of PROMPT_LENGTHS random
    tokens, and its gates: a dense one, then the per-row rule forcing `forced[i]` skips on row i
    (it fires at the first hot layer) -> (step, prompts, gates)."""
    prompts = [torch.randint(1, 512, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    skip = SkipConfig(cold_start=1, cold_end=1)
    policy = build_policy(skip, model.cfg.num_layers)
    skipping = [RowSkip(n, -1.0) for n in forced]
    gates = [lambda: DenseGate(model.cfg.num_layers), lambda: policy.make_gate(skipping, "cpu")]
    return DecodeStep(model, kv, max_batch=4, max_blocks=4, skip=skip, quorum=policy.quorum), prompts, gates


@pytest.mark.parametrize("model_type, config", [("qwen3", {}), ("mistral", {"sliding_window": 20}),
                                                ("llama", {"partial_rotary_factor": 0.75})])
def test_random_models_decode_step_is_the_torch_backends(model_type, config, monkeypatch):
    """Qwen3: each q and k head normed before the rotation; Mistral 7B v0.1's sliding window (20
    here: the 38-token row attends to its last 20 positions, the others to all of theirs);
    Phi-4-mini's partial rotary (the leading 48 of 64 dimensions). Hidden states, greedy tokens,
    K/V and skips as the torch backend's decode (Qwen3's dense products on the masked kernels)."""
    generator = torch.Generator().manual_seed(0)
    model, kv = random_model(generator, model_type, **config)
    step, prompts, gates = hot_layer_step(model, kv, generator, [0, 2, 0])
    layer = model.layers[0]
    assert DecodeStep.fits(model, kv) and layer.kind == ("qwen3" if model_type == "qwen3" else "llama")
    assert layer.window == config.get("sliding_window") and model.cfg.rotary_dim == (48 if config.get("partial_rotary_factor") else 64)
    dense_products_on(step, len(prompts), model_type == "qwen3", monkeypatch)
    expected, k_prefilled = assert_step_decodes_as_the_torch_backend(model, kv, step, prompts, gates)
    assert expected[1][2][0] == [0, 2, 0]
    assert not torch.equal(kv.k, k_prefilled)


# Gemma 3: layers 0-2 sliding (window 20) on the local rotary table, 3 global; Gemma 2: sliding
# and global layers alternating on one table, scores soft-capped (at 2 here, so the cap bends them)
SLIDING = ["sliding_attention"] * 3 + ["full_attention"]
GEMMA_CONFIGS = {
    "gemma3_text": dict(layer_types=SLIDING, sliding_window=20, query_pre_attn_scalar=48, rope_local_theta=1e4),
    "gemma2": dict(layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=20,
                   query_pre_attn_scalar=48, attn_logit_softcapping=2.0, final_logit_softcapping=30.0),
}


@pytest.mark.parametrize("model_type", list(GEMMA_CONFIGS))
def test_gemma_decode_step_is_the_torch_backends(model_type, monkeypatch):
    """Gemma's layer: the attention's output normed before the residual add, the FFN's input on a
    norm of its own and its output normed too (a skipped FFN leaves h as it is), GELU-tanh, scaled
    embeddings, queries scaled by query_pre_attn_scalar; Gemma 3's per-head q/k norms and local
    rotary table, Gemma 2's capped scores. Hidden states, greedy tokens, K/V and skips as the
    torch backend's decode, dense (Gemma 3's products on the masked kernels, Gemma 2's on torch's
    linear) and with rows skipping."""
    generator = torch.Generator().manual_seed(1)
    model, kv = random_model(generator, model_type, **GEMMA_CONFIGS[model_type])
    assert [layer.kind for layer in model.layers] == [model_type.removesuffix("_text")] * 4
    assert DecodeStep.fits(model, kv)
    if model_type == "gemma3_text":
        assert [layer.rope_kind for layer in model.layers] == ["local"] * 3 + ["global"]
    else:
        assert {layer.softcap for layer in model.layers} == {2.0}
    step, prompts, gates = hot_layer_step(model, kv, generator, [2, 0, 1])
    dense_products_on(step, len(prompts), model_type == "gemma3_text", monkeypatch)
    expected, _ = assert_step_decodes_as_the_torch_backend(model, kv, step, prompts, gates)
    assert expected[1][2][0] == [2, 0, 1]


# Qwen3-MoE: 8 experts, 3 a token, renormalized; Mixtral: 2 a token, renormalized, with Mistral
# 7B v0.1's sliding window (20 here); gpt-oss: 8 experts, 2 a token, sliding and full
# layers alternating (window 20), YaRN rope, clamped SwiGLU at a limit of 1.5 (so the clamp bends
# the random activations), biases and sinks
MIXTURE_CONFIGS = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=True),
    "mixtral": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                    sliding_window=20),
    "gpt_oss": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, swiglu_limit=1.5,
                    layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=20,
                    rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                      original_max_position_embeddings=32, truncate=False)),
}


@pytest.mark.parametrize("model_type", list(MIXTURE_CONFIGS))
def test_mixture_decode_step_is_the_torch_backends(model_type):
    """A router and experts in place of the FFN, on the routed expert kernels: each row's chosen
    experts, their routing weights, a skipped row routed to none. Hidden states, greedy tokens, K/V
    and skips as the torch backend's decode (its experts one after another over their rows),
    dense and with rows skipping; gpt-oss's biases, sinks, windows and YaRN rope too."""
    generator = torch.Generator().manual_seed(2)
    model, kv = random_model(generator, model_type, **MIXTURE_CONFIGS[model_type])
    assert [layer.kind for layer in model.layers] == [model_type] * 4 and DecodeStep.fits(model, kv)
    step, prompts, gates = hot_layer_step(model, kv, generator, [1, 2, 0])
    assert step.tune() == []  # the routed experts' kernels run on their default tiles
    expected, _ = assert_step_decodes_as_the_torch_backend(model, kv, step, prompts, gates)
    assert expected[1][2][0] == [1, 2, 0]


@pytest.mark.parametrize("gated", [False, True], ids=["dense", "gated"])
def test_a_buckets_padded_rows_choose_no_expert(gated, monkeypatch):
    """A graph replays a bucket's rows (4 for 3 real ones): the padded row is routed to no expert
    in any layer (cold, hot or dense), so it reads no expert's weight that the real rows did not
    choose, and the real rows come out as an unpadded step gives them."""
    from engine.backends.cuda.graphs import DecodeInputs
    from engine.backends.cuda.masked_moe import MaskedMoE

    model, kv = random_model(torch.Generator().manual_seed(3), "qwen3_moe", **MIXTURE_CONFIGS["qwen3_moe"])
    step = DecodeStep(model, kv, max_batch=4, max_blocks=4, skip=SkipConfig(cold_start=1, cold_end=1), quorum=None)
    runs, original = [], MaskedMoE.__call__

    def recording(self, h, run=None, normed=None):
        runs.append(None if run is None else run.tolist())
        return original(self, h, run, normed)

    monkeypatch.setattr(MaskedMoE, "__call__", recording)
    inputs = DecodeInputs([5, 6, 7], [15, 16, 37], TABLES, [0] * 3, [0.5] * 3)  # budget 0: no row skips
    with torch.inference_mode():
        alone = step.forward(step.buffers.fill(inputs, 3), gated).clone()
        runs.clear()
        padded = step.forward(step.buffers.fill(inputs, 4), gated)
    assert runs == [[1, 1, 1, 0]] * model.cfg.num_layers
    torch.testing.assert_close(padded[:3], alone, **TOLERANCE)
