"""The CUDA path (bf16 weights; decode on the Triton decode step with the skip gate on the device,
replayed as CUDA graphs), where CUDA is present.

The CPU tests compare bit for bit with HF's fp32 model; here both sides run bf16 on the GPU with
different kernels (our fused projections vs HF's separate ones), so logits differ by bf16 rounding
(~1e-2 relative) and a near-tie can flip a greedy token, after which free-running texts diverge.
So agreement is measured teacher-forced on our own greedy tokens: HF's argmax at each generated
position must equal the token we produced at >= 90% of positions.
"""
from __future__ import annotations

import pytest
import torch

from engine.backends.cuda.graphs import batch_buckets
from engine.sampling_params import SamplingParams, SkipParams
from tests.helpers import engine_like

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def cuda_engine():
    from engine.llm_engine import LLMEngine
    from server.config_file import load_config, preset_path

    config = load_config(preset_path(MODEL))
    config.device, config.max_num_seqs, config.max_model_len = "cuda", 4, 1024
    config.kv_capacity_tokens = 4 * 1024  # leaves the card to the eager engine beside it
    # Every prompt prefilled whole in both engines (eager_engine copies this): after earlier tests a
    # prefix hit would leave this engine only a prompt's tail to prefill, GEMMs of other shapes whose
    # bf16 rounding differs from the fresh eager engine's, and graphs vs eager compares tokens exactly.
    config.prefix_caching = False
    return LLMEngine(config)


@pytest.fixture(scope="module")
def eager_engine(cuda_engine):
    return engine_like(cuda_engine, enforce_eager=True)


@pytest.fixture(scope="module")
def hf_cuda(cuda_engine):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(cuda_engine.hf_dir), dtype=torch.bfloat16).cuda().eval()


def teacher_forced_agreement(hf, prompt: list[int], generated: list[int]) -> float:
    ids = torch.tensor([prompt + generated], device="cuda")
    with torch.inference_mode():
        logits = hf(ids).logits[0, len(prompt) - 1:-1]
    return (logits.argmax(-1).cpu() == torch.tensor(generated)).float().mean().item()


def test_cuda_greedy_agrees_with_hf_bf16(cuda_engine, hf_cuda):
    assert cuda_engine.runner.device.type == "cuda" and cuda_engine.runner.dtype == torch.bfloat16
    prompts = [cuda_engine.tokenizer.encode_chat([{"role": "user", "content": q}])
               for q in ("What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.")]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt, (_, ids, _) in zip(prompts, cuda_engine.generate(prompts, params)):
        assert len(ids) == NEW_TOKENS
        assert teacher_forced_agreement(hf_cuda, prompt, ids) >= 0.9


def test_cuda_skipping_reports_exact_usage(cuda_engine):
    """The device gate decides without host syncs; the counts it reports after the step are what
    usage says, and warm-up tokens stay dense."""
    prompt = cuda_engine.tokenizer.encode_chat([{"role": "user", "content": "Tell me about the ocean."}])
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    (_, ids, out), = cuda_engine.generate([prompt], params, SkipParams(budget=0.3, threshold=0.0))
    layers = cuda_engine.model_config.num_layers
    assert out.ffn_total == layers * len(ids)
    k = int(0.3 * layers)
    assert 0 < out.ffn_skipped <= k * (len(ids) - 16)


def test_decode_runs_the_triton_step_in_a_cuda_graph_per_bucket(cuda_engine, eager_engine):
    """Captured at start for every bucket up to the max batch, dense and gated: a capture fails on
    any host sync inside the step, so captured graphs also mean the step never waits for the host."""
    step, buckets = cuda_engine.runner.decode_step, batch_buckets(cuda_engine.config.max_num_seqs)
    assert step is not None and step.graphs.captured("dense") == step.graphs.captured("gated") == buckets
    assert eager_engine.runner.decode_step is not None and not eager_engine.runner.decode_step.graphs.graphs


def test_graphs_and_enforce_eager_give_the_same_greedy_text_and_skips(cuda_engine, eager_engine):
    """Four rows fill bucket 4 exactly, so the replayed graphs run the very kernels and shapes of
    the eager steps: the same tokens and skip counts, dense and with a forced skip."""
    prompts = [cuda_engine.tokenizer.encode_chat([{"role": "user", "content": q}])
               for q in ("What is the capital of France?", "Write a haiku about the sea.",
                         "List three prime numbers.", "Tell me about the ocean.")]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    forced = SkipParams(budget=0.25, threshold=-1.0, warmup_tokens=0)
    for skip in (None, forced):
        graphed = cuda_engine.generate(prompts, params, skip)
        eager = eager_engine.generate(prompts, params, skip)
        assert [ids for _, ids, _ in graphed] == [ids for _, ids, _ in eager]
        assert [out.ffn_skipped for _, _, out in graphed] == [out.ffn_skipped for _, _, out in eager]
    assert all(out.ffn_skipped > 0 for _, _, out in graphed)  # the forced run did skip


@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral", "gpt-oss"])
def test_mixtures_decode_on_the_triton_step_as_on_the_cpu(arch, tmp_path):
    """Qwen3-MoE's, Mixtral's and gpt-oss's tiny files (tests/tiny_gguf.py) in fp32: the CUDA engine decodes
    on the Triton step (the routed expert kernels, in CUDA graphs) and gives the CPU engine's greedy
    tokens and skip counts, dense and with a forced skip, four rows at once."""
    from engine.loader import embedded_gguf
    from tests.tiny_gguf import tiny_engine, write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, embedded_gguf(MODEL))
    cpu, cuda = tiny_engine(gguf, tmp_path, "float32"), tiny_engine(gguf, tmp_path, "float32", device="cuda")
    step = cuda.runner.decode_step
    assert step is not None and step.graphs.captured("dense") and step.graphs.captured("gated")
    prompts = [cpu.tokenizer.encode(text) for text in ("The quick brown fox", "Once upon a time", "1, 2, 3,", "Hello")]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for skip in (None, SkipParams(budget=0.5, threshold=-1.0, warmup_tokens=0)):
        on_cpu, on_cuda = cpu.generate(prompts, params, skip), cuda.generate(prompts, params, skip)
        assert [ids for _, ids, _ in on_cuda] == [ids for _, ids, _ in on_cpu]
        assert [out.ffn_skipped for _, _, out in on_cuda] == [out.ffn_skipped for _, _, out in on_cpu]
    assert all(out.ffn_skipped > 0 for _, _, out in on_cuda)  # the forced run did skip
