"""Mixture-of-experts GGUFs with softmax-routed SwiGLU experts, each expert kind one [experts,
rows, columns] tensor in the file, small with random weights (tests/tiny_gguf.py: 4 experts, 2 a
token): Qwen3-MoE's layout (Qwen3's attention), Mixtral's (Mistral's attention; llama.cpp
writes it as a `llama` file with an expert count) and Qwen2-MoE's (Qwen2's attention, a shared
expert beside the routed ones). transformers' model on the same file,
dequantized, is the reference: fp32 logits and greedy text alone and in a staggered batch; the
quantized experts within their activations' rounding; FFN skips over the whole mixture; a served
chat answer (Qwen3-MoE's; Mixtral's file takes the same path once its config is read, above)."""
from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.helpers import (KERNEL_TYPES, assert_layer_calls_equal_the_per_op_path, assert_quantized_close_and_skipping,
                           assert_served_chat_is_the_engines, hf_greedy,
                           hf_model_of, prefill_logits, run_staggered, saved_checkpoint_engine)
from tests.tiny_gguf import EXPERT_FFN, EXPERTS, LAYERS, USED, quantized_tiny_engine, tiny_engine, write_tiny_gguf

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 4, "Once upon a time", "1, 2, 3, 4, 5,"]


# the file's layout -> the model transformers and the engine read it as
LAYOUTS = {"qwen3moe": ("Qwen3MoeModel", "Qwen3MoeForCausalLM"), "mixtral": ("MixtralModel", "MixtralForCausalLM"),
           "qwen2moe": ("Qwen2MoeModel", "Qwen2MoeForCausalLM")}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    return request.param


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, layout):
    return tmp_path_factory.mktemp(layout)


@pytest.fixture(scope="module")
def gguf(cache_dir, layout):
    from engine.loader import embedded_gguf

    return write_tiny_gguf(cache_dir / f"{layout}.gguf", layout, embedded_gguf("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def dense(gguf, cache_dir):
    return tiny_engine(gguf, cache_dir, "float32")


@pytest.fixture(scope="module")
def quantized(gguf, cache_dir):
    return quantized_tiny_engine(gguf, cache_dir)


@pytest.fixture(scope="module")
def reference(dense):
    """transformers' model on the same file, and the prompts as token ids."""
    return hf_model_of(dense), [dense.tokenizer.encode(text) for text in TEXTS]


def test_fp32_logits_and_greedy_text_equal_hf(dense, reference, layout):
    hf_model, prompts = reference
    model = dense.runner.model
    assert type(model).__name__ == LAYOUTS[layout][0]
    assert model.fused_decode is not None  # decode steps in native layer calls
    renormalized = layout != "qwen2moe"  # Qwen2-MoE's weights are the softmax's, as chosen
    assert (model.cfg.num_experts, model.cfg.num_experts_per_tok, model.cfg.norm_topk_prob) == (EXPERTS, USED, renormalized)
    assert model.cfg.moe_intermediate_size == EXPERT_FFN
    assert type(hf_model).__name__ == LAYOUTS[layout][1]
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
    """Per hidden state the engine's routing (`route`, which the CUDA decode step runs too) chooses
    transformers' experts with its weights, and 64 random states reach every expert of the layer
    (so the logits test above could route through any)."""
    layer, hf_layer = dense.runner.model.layers[1], reference[0].model.layers[1]
    x = torch.randn(64, dense.runner.model.cfg.hidden_size)
    with torch.inference_mode():
        _, their_weights, theirs = hf_layer.mlp.gate(x)
        weights, ours = layer.route(layer.router(x))
    ours_sorted, theirs_sorted = ours.sort(-1), theirs.sort(-1)
    assert torch.equal(ours_sorted.values, theirs_sorted.values)
    torch.testing.assert_close(weights.gather(-1, ours_sorted.indices),
                               their_weights.float().gather(-1, theirs_sorted.indices))
    assert set(ours.flatten().tolist()) == set(range(EXPERTS))


def test_quantized_experts_come_within_rounding_of_fp32(quantized, dense, reference):
    prompts = reference[1]
    layer = quantized.runner.model.layers[0]
    assert layer.experts[0][0].backend.startswith("quant-")
    assert_quantized_close_and_skipping(quantized, dense, prompts, GREEDY, LAYERS)


@pytest.mark.parametrize("weights", ["float32", "quantized"])
def test_native_layer_calls_equal_the_per_op_path(request, reference, layout, weights):
    """The decode steps in native layer calls (decode_layers.cpp, the FFN in routed_experts.cpp, with
    Qwen2-MoE's shared expert) against the per-op path (mix_experts): dense and skipping steps, on
    fp32 and on quantized weights. Not to the bit: the native code computes the routing's softmax itself,
    and a layer's FFN differs from the per-op path's by an ulp or two (1.2e-7 and 2.4e-7 on outputs
    of 1.5, measured), which these random layers grow to ~1.5e-4 in the logits."""
    engine = request.getfixturevalue("dense" if weights == "float32" else "quantized")
    assert engine.runner.model.fused_decode is not None
    assert_layer_calls_equal_the_per_op_path(engine, reference[1], skips=LAYERS - 2, tolerance=1e-3)


@pytest.mark.parametrize("rows", [1, 3])
def test_a_native_step_runs_only_the_chosen_experts_once_each(dense, reference, layout, rows):
    """Every expert's down projection in the native step's expert tables swapped for one that records
    its rows: per layer each row reaches its `USED` experts, each chosen expert runs once over all
    its rows, and no other runs (at one row, USED of the EXPERTS a layer)."""
    import ctypes

    from engine.backends.cpu.fused_decode import EXPERTS_COLUMN

    runner, fused = dense.runner, dense.runner.model.fused_decode
    tables = {t.data_ptr(): t for t in fused.part_tables}
    experts = [tables[int(fused.table[i, EXPERTS_COLUMN])] for i in range(LAYERS)]  # each layer's [EXPERTS, 2 x 10]
    signature, rows_at = KERNEL_TYPES[0]  # the dense kernel's
    calls, callbacks, saved = [], [], [t[:, 11].clone() for t in experts]
    for layer, table in enumerate(experts):
        assert table.shape == (EXPERTS, 20) and set(table[:, 10].tolist()) == {0}  # dense WeightRefs
        for e in range(EXPERTS):
            real = signature(int(table[e, 11]))

            def call(*args, layer=layer, e=e, real=real):
                calls.append((layer, e, args[rows_at]))
                return real(*args)

            callbacks.append(signature(call))
            table[e, 11] = ctypes.cast(callbacks[-1], ctypes.c_void_p).value
    prompts = (reference[1] * rows)[:rows]
    try:
        with dense.kv_blocks([len(p) + 1 for p in prompts]) as block_tables:
            runner.prefill([(p, table, 0) for p, table in zip(prompts, block_tables)])
            calls.clear()  # the prefill ran experts too: only the decode step's are counted
            runner.decode([p[-1] for p in prompts], [len(p) for p in prompts], block_tables)
    finally:
        for table, kernels in zip(experts, saved):
            table[:, 11] = kernels
    for layer in range(LAYERS):
        ran = [(e, n) for at, e, n in calls if at == layer]
        assert len({e for e, _ in ran}) == len(ran)  # each chosen expert once
        assert all(n > 0 for _, n in ran) and sum(n for _, n in ran) == rows * USED
    if rows == 1:
        assert len(calls) == LAYERS * USED < LAYERS * EXPERTS


def test_drafts_checked_in_the_native_step_keep_the_text(gguf, cache_dir, dense, reference, layout):
    """On the native step a mixture takes speculative decoding too (drafts checked as decode rows of
    their sequence, each row routed alone): greedy text as without drafts, and drafts were taken."""
    if layout != "qwen3moe":
        pytest.skip("one layout is enough: the drafts' rows run the layer the other layouts run")
    speculative = tiny_engine(gguf, cache_dir, "float32", speculative_tokens=3)
    assert speculative.speculative_tokens == 3
    params = SamplingParams(temperature=0.0, max_tokens=48)
    for prompt in reference[1]:
        plain = dense.generate([prompt], params)[0][1]
        assert speculative.generate([prompt], params)[0][1] == plain
    assert speculative.accepted_draft_tokens_total > 0


def test_served_over_http(dense, gguf, cache_dir, layout):
    if layout != "qwen3moe":
        pytest.skip("one layout served is enough: the server reads a file as the engine above does")
    assert_served_chat_is_the_engines(dense, gguf, cache_dir)


def test_a_transformers_checkpoint_serves_the_same_model(dense, reference, tmp_path):
    """A folder as transformers saves the model (the hub checkpoints' names: Mixtral's
    `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen3-MoE's one matrix per expert) serves the file's
    logits."""
    hf_model, prompts = reference
    engine, _ = saved_checkpoint_engine(hf_model, dense, tmp_path / "checkpoint")
    for prompt in prompts:
        assert (prefill_logits(engine, prompt) - prefill_logits(dense, prompt)).abs().max().item() < 1e-4


def test_a_file_with_a_tensor_per_expert_reads_as_the_stacked_one(gguf, cache_dir, layout):
    """llama.cpp wrote Mixtral's experts one tensor each (`blk.N.ffn_gate.E.weight`) before it
    stacked them; such a file gives the same weights under the same names."""
    from engine.gguf_weights import load_weights
    from engine.loader import embedded_gguf

    if layout != "mixtral":
        pytest.skip("Mixtral's older files only")
    split = write_tiny_gguf(cache_dir / "split.gguf", layout, embedded_gguf("smollm2-135m-instruct"), split_experts=True)
    stacked, own = load_weights(gguf), load_weights(split)
    assert sorted(own) == sorted(stacked) and "model.layers.3.mlp.experts.3.down_proj.weight" in own
    for name, weight in stacked.items():
        mine = own[name]
        assert torch.equal(mine.dequantize() if hasattr(mine, "dequantize") else mine,
                           weight.dequantize() if hasattr(weight, "dequantize") else weight), name


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_mix_experts_sums_each_rows_experts_as_a_gather_and_scatter_would(rows):
    """engine/models/moe.py's mix_experts (in place where every row chose an expert, at the same
    slot or not; gathered and scattered where some did) gives the bits of the plain formulation:
    per expert in ascending order, its rows gathered, weighed and added back."""
    from engine.models.moe import mix_experts

    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 24, generator=generator)
    chosen = torch.stack([torch.randperm(6, generator=generator)[:3] for _ in range(rows)])
    if rows > 1:
        chosen[:, 2] = 5  # an expert every row chose at the same slot
        chosen[0, :2], chosen[1:, :2] = torch.tensor([4, 0]), torch.tensor([0, 1])  # and one at different slots
    weights = torch.rand(rows, 3, generator=generator)
    mats = torch.randn(6, 24, 24, generator=generator)

    def expert(index, part):
        return torch.tanh(part @ mats[index])

    expected = torch.zeros_like(x)
    for index in chosen.unique().tolist():
        at, slot = (chosen == index).nonzero(as_tuple=True)
        expected.index_add_(0, at, expert(index, x[at]) * weights[at, slot, None])
    assert torch.equal(mix_experts(x, chosen, weights, expert), expected)
