"""The embedded SmolLM2 GGUF served in its own quantization (`--dtype auto` on the CPU) against the
same file dequantized to fp32 (`--dtype float32`): same weights, logits within the activations'
int16 rounding, same greedy text alone and in a batch (on the fp16 KV cache quantized weights get
by default, against fp32's fp32 cache), native layer calls equal to the per-op path, FFN skips that
read no weights."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from engine.native import quant_ops
from engine.sampling_params import SamplingParams
from engine.skip import RowSkip, build_policy
from engine.quant import QuantWeight
from tests.helpers import (assert_gguf_weights_equal_the_dense_conversion, assert_layer_calls_equal_the_per_op_path,
                           prefill_logits, recording_down_kernels, run_staggered)

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def quantized(engine):
    """The default preset as served: dtype auto on the CPU (the session `engine` is its fp32 twin)."""
    from engine.llm_engine import LLMEngine

    config = copy.deepcopy(engine.config)
    config.dtype = "auto"
    quantized = LLMEngine(config)
    if not quantized.runner.quantized:
        pytest.skip("no quantized kernel for this CPU (x86-64-v3 or newer) or no native library")
    return quantized


def test_gguf_matrices_stay_quantized_and_equal_the_dense_conversion(quantized):
    """Every projection and the tied embedding hold the GGUF's blocks, repacked without loss; what
    the engine reads from the file equals transformers' dense conversion bit for bit (which also
    checks the names and the undone q/k row permutation)."""
    from engine.loader import resolve_model_path

    model = quantized.runner.model
    assert all(lin.backend.startswith("quant-") for layer in model.layers
               for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
    assert model.lm_head.weight is model.embed  # tied: the lm_head reads the quantized embedding
    weights, dense = assert_gguf_weights_equal_the_dense_conversion(resolve_model_path(quantized.config.model),
                                                                    quantized.hf_dir)
    assert {w.source for w in weights.values() if isinstance(w, QuantWeight)} == {"Q4_1", "Q8_0"}
    fp32_bytes = sum(t.numel() * 4 for name, t in dense.items() if isinstance(weights[name], QuantWeight))
    assert sum(model.weight_bytes().values()) < fp32_bytes / 4


def test_logits_match_the_dequantized_fp32_model(quantized, engine, chat_prompts):
    """Logits at every position of the prompts and of fp32's greedy answers to them within 0.1
    absolute of the fp32 model on the same file (logits of O(10-30)): the kernels multiply the same
    weights (dequantized exactly) with the activations rounded to int16 per group of 32 (2^-16 of
    the group's largest input) in each of the 121 projections; this host measures ~0.01. A wrong
    scale or layout moves logits by whole units. So greedy decoding picks fp32's token wherever
    fp32's top two are further apart than the tolerance lets them swap (where they are closer, the
    two models' texts could part)."""
    tolerance = 0.1
    for prompt in chat_prompts[:3]:
        text = prompt + engine.generate([prompt], GREEDY)[0][1]
        ours, dense = prefill_logits(quantized, text), prefill_logits(engine, text)
        assert (ours - dense).abs().max().item() < tolerance
        top2 = dense.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
        assert clear.float().mean() > 0.8  # most positions are clear: the check below has teeth
        assert torch.equal(ours.argmax(-1)[clear], dense.argmax(-1)[clear])


def test_kv_cache_dtype_follows_the_weights(quantized, engine):
    """auto: fp16 for quantized weights (half the cache's bytes), fp32 for dense ones; an explicit
    choice wins; CUDA takes only auto."""
    from engine.model_runner import check_kv_dtype, resolve_kv_dtype

    assert quantized.runner.kv_dtype == torch.float16 and engine.runner.kv_dtype == torch.float32
    assert quantized.runner.kv.k.dtype == torch.float16
    blocks = quantized.runner.kv.k.shape[1]
    assert quantized.runner.kv.nbytes / blocks == engine.runner.kv.nbytes / engine.runner.kv.k.shape[1] / 2
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kv_dtype("float32", torch.float32, cpu, quantized=True) == torch.float32
    assert resolve_kv_dtype("float16", torch.float32, cpu, quantized=False) == torch.float16
    assert resolve_kv_dtype("auto", torch.bfloat16, cuda, quantized=False) == torch.bfloat16
    assert resolve_kv_dtype("int8", torch.float32, cpu, quantized=True) == torch.int8
    with pytest.raises(ValueError, match="CPU option"):
        check_kv_dtype("float16", cuda)
    with pytest.raises(ValueError, match="CPU option"):
        check_kv_dtype("int8", cuda)
    with pytest.raises(ValueError, match="one of auto, float32, float16, int8"):
        check_kv_dtype("bf16", cpu)  # a config file's typo: named, not a KeyError


@pytest.fixture(scope="module")
def int8_cache(quantized):
    """The default preset with `--kv-cache-dtype int8`."""
    from engine.llm_engine import LLMEngine

    config = copy.deepcopy(quantized.config)
    config.kv_cache_dtype = "int8"
    return LLMEngine(config)


def test_an_int8_cache_holds_rows_of_int8_with_their_scales(quantized, int8_cache):
    """0.5625x the fp16 cache's bytes a token (64 int8 values and two fp32 scales a head, against 64
    fp16 values), so the same memory holds 1.78x the tokens."""
    from engine.kv import int8_rows

    kv = int8_cache.runner.kv
    head_dim = quantized.runner.kv.k.shape[-1]
    assert kv.k.dtype == kv.v.dtype == torch.int8 and kv.k.shape[-1] == int8_rows.row_bytes(head_dim)
    assert kv.nbytes / kv.k.shape[1] == quantized.runner.kv.nbytes / quantized.runner.kv.k.shape[1] * 0.5625
    assert int8_cache.runner.capacity.bytes_per_block == quantized.runner.capacity.bytes_per_block * 0.5625
    assert int8_cache.runner.model.fused_decode is not None  # the native step reads it


def test_the_int8_cache_keeps_the_fp16_caches_clear_choices(quantized, int8_cache, chat_prompts):
    """Over prompts and the answers fp16 gives them, the int8 cache's logits make fp16's choice
    wherever fp16's top two are clearly apart (most positions); and its own greedy answers are what
    a prefill over the int8 cache picks again at each clear position: decode steps read the rows
    that prefill writes (the native kernel's own rows bit for bit as the torch path's:
    tests/test_native_kernels.py)."""
    for prompt in chat_prompts[:3]:
        text = prompt + quantized.generate([prompt], GREEDY)[0][1]
        ours, fp16 = prefill_logits(int8_cache, text), prefill_logits(quantized, text)
        top2 = fp16.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.5
        assert clear.float().mean() > 0.6  # most positions are clear: the check below has teeth
        assert torch.equal(ours.argmax(-1)[clear], fp16.argmax(-1)[clear])
        answer = int8_cache.generate([prompt], GREEDY)[0][1]
        again = prefill_logits(int8_cache, prompt + answer)[len(prompt) - 1:-1]
        top2 = again.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.5
        assert clear.float().mean() > 0.6  # most positions are clear: the check below has teeth
        assert torch.equal(again.argmax(-1)[clear], torch.tensor(answer)[clear])


def test_greedy_text_equals_fp32_alone_and_in_a_staggered_batch(quantized, engine, chat_prompts):
    """The text is fp32's up to a near-tie: where the two part, fp32's two likeliest tokens are the
    two models' choices, closer than the logits' tolerance above lets them swap. (Hosts differ:
    on one with AVX512-FP16 and AMX, "List three prime numbers." parts where fp32's top two are
    0.003 apart, on others it does not part.) In a staggered batch the text is the same as alone."""
    tolerance = 0.1
    assert quantized.runner.kv_dtype == torch.float16  # the cache as served
    alone = [quantized.generate([p], GREEDY)[0][1] for p in chat_prompts]
    dense = [engine.generate([p], GREEDY)[0][1] for p in chat_prompts]
    same = 0
    for prompt, ours, theirs in zip(chat_prompts, alone, dense):
        parted = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if parted is None:
            assert ours == theirs
            same += 1
            continue
        top2 = prefill_logits(engine, prompt + theirs[:parted])[-1].topk(2)
        assert set(top2.indices.tolist()) == {ours[parted], theirs[parted]}
        assert top2.values[0] - top2.values[1] < 2 * tolerance
    assert same >= len(chat_prompts) - 1  # a near-tie is rare: the check has teeth
    assert run_staggered(quantized, chat_prompts, GREEDY, join_every=3) == alone


def test_avx2_build_serves_the_same_text(quantized, chat_prompts, monkeypatch):
    """The AVX2 kernels (what an AVX2-only host runs) give the AVX-512 build's greedy text (their
    outputs are the same bits: tests/test_quant_kernels.py)."""
    from engine.llm_engine import LLMEngine

    if "avx2" not in quant_ops.isas():
        pytest.skip("this CPU does not run the AVX2 build")
    monkeypatch.setattr(quant_ops, "best_isa", lambda: "avx2")
    config = copy.deepcopy(quantized.config)
    config.max_num_seqs = 2
    avx2 = LLMEngine(config)
    assert avx2.runner.model.layers[0].down.backend == "quant-avx2"
    for prompt in chat_prompts[:2]:
        assert avx2.generate([prompt], GREEDY)[0][1] == quantized.generate([prompt], GREEDY)[0][1]


def test_native_layer_calls_equal_the_per_op_path(quantized, chat_prompts):
    """The quantized projections inside decode_layers.cpp (through each weight's descriptor and the
    kernel build chosen in Python) give the per-op path's bits, dense and skipping."""
    assert quantized.runner.model.fused_decode is not None
    assert_layer_calls_equal_the_per_op_path(quantized, chat_prompts[:3])


@pytest.mark.parametrize("layer_calls", [True, False], ids=["native-layer-calls", "per-op"])
def test_a_skipped_ffn_reads_none_of_its_weights(quantized, chat_prompts, monkeypatch, layer_calls):
    """A decode step whose rows skip FFNs never calls the kernel on the down projection of a layer
    every row skipped: in the native step (its table's kernel pointer swapped for a recording one,
    so every call the C++ makes is seen) and on the per-op path."""
    from engine.backends.cpu.quant_linear import QuantLinear

    runner, model = quantized.runner, quantized.runner.model
    called = []
    if layer_calls:
        recording = recording_down_kernels(model.fused_decode, lambda layer, rows: called.append(layer))
    else:
        recording = contextlib.nullcontext()
        monkeypatch.setattr(model, "fused_decode", None)
        downs = {id(layer.down): i for i, layer in enumerate(model.layers)}
        original = QuantLinear.__call__

        def counting(self, x):
            if id(self) in downs:
                called.append(downs[id(self)])
            return original(self, x)

        monkeypatch.setattr(QuantLinear, "__call__", counting)
    prompts = chat_prompts[:2]
    with recording, quantized.kv_blocks([len(p) + 1 for p in prompts]) as tables:
        runner.prefill([(p, table, 0) for p, table in zip(prompts, tables)])
        called.clear()  # count the decode step only
        policy = build_policy(quantized.config.skip, runner.num_layers)
        gate = policy.make_gate([RowSkip(8, 0.0), RowSkip(8, 0.0)], runner.device)  # both fire at once
        runner.decode([p[-1] for p in prompts], [len(p) for p in prompts], tables, gate)
    per_row, per_layer = gate.skip_counts(len(prompts))
    assert per_row == [8, 8]
    skipped_by_all = {i for i, n in enumerate(per_layer) if n == len(prompts)}
    assert len(skipped_by_all) == 8
    assert set(called) == set(range(runner.num_layers)) - skipped_by_all


def test_int8_rounding_is_within_half_a_step():
    """--quantize int8: per group of 32, d = max|w| / 127 and |d * q - w| <= d / 2 (+ fp32 rounding)."""
    from engine.quant.int8 import quantize_int8

    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    w[5, 7] = 3.0  # an outlier coarsens only its own group
    q = quantize_int8(w)
    d = w.abs().view(48, 3, 32).amax(-1) / 127
    assert torch.equal(q.scale, d)
    err = (q.dequantize() - w).abs().view(48, 3, 32)
    assert (err <= d.unsqueeze(-1) * (0.5 + 1e-5)).all()
    assert err[5, 0].max() > 10 * err[4, 0].max()  # the outlier's group: coarser steps


def test_int8_option_serves_dense_weights_on_the_quantized_kernel(engine, chat_prompts):
    """--quantize int8 on dense weights (here the GGUF dequantized to fp32) runs every matrix on the
    quantized kernel at under a third of fp32's bytes (a byte a weight plus an fp32 scale per 32:
    28%) and keeps fp32's top token at >= 90% of positions
    of the prompts and fp32's answers (this host: 0.96-0.97; int8 rounds the 4-bit file's values
    to another grid, up to d / 2 each). A wrong layout or scale agrees at ~0%."""
    from engine.llm_engine import LLMEngine

    if quant_ops.best_isa() is None:
        pytest.skip("no quantized kernel for this CPU (x86-64-v3 or newer) or no native library")
    config = copy.deepcopy(engine.config)
    config.quantize, config.max_num_seqs = "int8", 2
    int8 = LLMEngine(config)
    model = int8.runner.model
    assert set(model.weight_formats()) == {"int8"}
    assert all(path.startswith("quant-") for path in model.weight_formats().values())
    assert sum(model.weight_bytes().values()) < sum(engine.runner.model.weight_bytes().values()) / 3
    for prompt in chat_prompts[:2]:
        text = prompt + engine.generate([prompt], GREEDY)[0][1]
        ours, dense = prefill_logits(int8, text), prefill_logits(engine, text)
        assert (ours.argmax(-1) == dense.argmax(-1)).float().mean().item() >= 0.9


def test_a_whole_prefill_attends_over_its_keys_and_values_as_the_fp16_cache_holds_them():
    """What a later chunk, a decode step or a request that finds the prefix cached reads back is the
    fp16 cache's rounding of a prompt's K/V; the prefill that wrote them attends over the same
    values (it used the unrounded ones: a cached prefix's logits differed from a whole prefill's by
    up to 0.005 on SmolLM2, and a seeded sampled answer could change with the cache's state)."""
    import torch.nn.functional as F

    from engine.backends.torch_backend import prefill_attention, write_kv
    from engine.kv.metadata import AttentionMetadata

    torch.manual_seed(0)
    tokens, heads, kv_heads, dim, block = 37, 6, 2, 16, 8
    q, k, v = (torch.randn(tokens, h, dim) * 3 for h in (heads, kv_heads, kv_heads))
    k_cache, v_cache = (torch.zeros(8, kv_heads, block, dim, dtype=torch.float16) for _ in range(2))
    meta = AttentionMetadata.for_prefill([(list(range(8)), 0, tokens)], block, "cpu")
    write_kv(k, v, k_cache, v_cache, meta)
    out = prefill_attention(q, k, v, k_cache, v_cache, meta, dim ** -0.5, None)
    rounded = [t.half().float().transpose(0, 1).unsqueeze(0) for t in (k, v)]
    expected = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), *rounded, is_causal=True,
                                              scale=dim ** -0.5, enable_gqa=True)[0].transpose(0, 1).reshape(tokens, -1)
    assert torch.allclose(out, expected, atol=1e-6)
    unrounded = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                               v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=dim ** -0.5,
                                               enable_gqa=True)[0].transpose(0, 1).reshape(tokens, -1)
    assert (out - unrounded).abs().max() > 1e-4  # the rounding shows: the check above has teeth
