"""Small helpers shared by the tests."""
from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import time
import weakref
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from engine.backends.cpu.fused_decode import LAYER_COLUMNS
from engine.sampling_params import SamplingParams, SkipParams
from engine.skip import DenseGate, RowSkip, build_policy


# decode_layers.cpp's LayerRow: the layer's columns, then a WeightRef of 10 columns per projection (qkv,
# o_proj, gate_up, down), each (kind, kernel, weight, scale, offset, bias, bits, group, scale_bits, table)
DOWN_REF = LAYER_COLUMNS + 3 * 10
_ptr, _int = ctypes.c_void_p, ctypes.c_int
KERNEL_TYPES = {  # by WeightRef kind: the C signatures decode_layers.cpp calls (and where `rows` is)
    0: (ctypes.CFUNCTYPE(None, *[_ptr] * 4, *[_int] * 4), 4),  # dense: x, w, bias, y, rows, in, out, threads
    1: (ctypes.CFUNCTYPE(_int, *[_ptr] * 7, *[_int] * 7), 7),  # quantized: x, q, scale, offset, table, bias, y, rows, ...
}


@contextlib.contextmanager
def recording_down_kernels(fused, record):
    """Swap each layer's down-projection kernel in the native decode step's table for one that calls
    `record(layer, rows)` and then the real kernel: every FFN the C++ runs is seen, with its rows."""
    table = fused.table
    saved = table[:, DOWN_REF + 1].clone()
    callbacks = []  # kept alive while the table points at them
    for i in range(table.shape[0]):
        signature, rows_at = KERNEL_TYPES[int(table[i, DOWN_REF])]
        real = signature(int(saved[i]))

        def call(*args, layer=i, real=real, rows_at=rows_at):
            record(layer, args[rows_at])
            return real(*args)

        callbacks.append(signature(call))
        table[i, DOWN_REF + 1] = ctypes.cast(callbacks[-1], ctypes.c_void_p).value
    try:
        yield
    finally:
        table[:, DOWN_REF + 1] = saved


_hf_greedy_tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(prompt, n): tokens}


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy tokens, cut after the first EOS (as the engine stops there); each
    model generates from a prompt once in the session (several tests hold the engine to the same
    prompts)."""
    known = _hf_greedy_tokens.setdefault(hf_model, {})
    key = (tuple(prompt_ids), max_new_tokens)
    if key not in known:
        known[key] = _generate_greedy(hf_model, prompt_ids, max_new_tokens)
    return list(known[key])


def _generate_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    ids = out[0, len(prompt_ids):].tolist()
    eos = hf_model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def run_staggered(engine, prompts: list[list[int]], params: SamplingParams, join_every: int, skip=None):
    """Submit prompt i after i*join_every engine steps; run all to completion -> token ids per prompt."""
    ids = {f"stagger-{i}": [] for i in range(len(prompts))}
    step = 0
    pending = list(enumerate(prompts))
    while pending or engine.has_work:
        while pending and step >= pending[0][0] * join_every:
            i, prompt = pending.pop(0)
            engine.add_request(f"stagger-{i}", prompt, params, skip)
        for out in engine.step()[0]:
            ids[out.request_id] += out.token_ids
        step += 1
    return [ids[f"stagger-{i}"] for i in range(len(prompts))]


def engine_like(engine, **overrides):
    """Another engine on the same weights, with some settings changed."""
    from engine.llm_engine import LLMEngine

    config = copy.deepcopy(engine.config)
    for key, value in overrides.items():
        setattr(config, key, value)
    return LLMEngine(config)


def assert_all_blocks_back(engine):
    """Every KV block unreferenced (cached ones stay cached, and count as free)."""
    assert engine.blocks.ref_counts == [0] * engine.blocks.num_blocks
    assert engine.kv_usage() == 0.0 and engine.blocks.num_free_blocks == engine.blocks.num_blocks


async def stream_chat(aclient, **request) -> tuple[str, str | None]:
    """One streamed chat completion through the openai SDK -> (text, finish reason)."""
    stream = await aclient.chat.completions.create(stream=True, **request)
    chunks = [c async for c in stream if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
def assert_gguf_weights_equal_the_dense_conversion(gguf_path, hf_dir) -> tuple[dict, dict]:
    """What the quantized path reads from a GGUF (engine/gguf_weights.py: QuantWeights and fp32
    tensors) holds the names and, dequantized, the values of transformers' dense conversion of the
    same file, bit for bit -> (the GGUF's weights, the dense state)."""
    from engine.gguf_weights import load_weights
    from engine.loader import load_state_dict
    from engine.quant import QuantWeight

    weights, dense = load_weights(gguf_path), load_state_dict(hf_dir)
    assert set(weights) == set(dense)
    for name, weight in weights.items():
        value = weight.dequantize() if isinstance(weight, QuantWeight) else weight
        assert torch.equal(value, dense[name]), name
    return weights, dense


def assert_layer_calls_equal_the_per_op_path(engine, prompts: list[list[int]], skips: int = 8, tolerance: float = 0.0,
                                             adapters: list[int] | None = None):
    """A dense decode step and steps whose gate skips FFNs (even rows skip `skips` layers, odd ones none)
    through the native layer calls give the per-op path's logits, K/V and skip counts to the bit (or,
    with a `tolerance`, logits and K/V within it: a mixture's routing weights, whose softmax the
    native code computes itself): FFN-SkipLLM's rule inside the one-call step, and the batch-aligned
    rule through the per-layer branch calls. `adapters`: each row's LoRA adapter slot (the batch-aligned
    rule's steps with adapters run the per-op path both ways: it is compared with itself there)."""
    runner, model = engine.runner, engine.runner.model
    fused = model.fused_decode
    if fused is None:
        pytest.skip("the native layer calls do not apply here (no native GEMMs for these weights on this CPU)")
    policies = [build_policy(dataclasses.replace(engine.config.skip, policy=name), runner.num_layers)
                for name in ("ffn_skipllm", "batch_aligned")]
    with engine.kv_blocks([len(p) + 1 for p in prompts]) as tables:
        runner.prefill([(p, table, 0) for p, table in zip(prompts, tables)])
        used = torch.tensor(sorted({block for table in tables for block in table}))  # (not the whole cache's copies)
        k_before, v_before = runner.kv.k[:, used].clone(), runner.kv.v[:, used].clone()

        def step(gate, native: bool):
            runner.kv.k[:, used] = k_before
            runner.kv.v[:, used] = v_before
            model.fused_decode = fused if native else None  # None: the per-op path
            try:
                hidden = runner.decode([p[-1] for p in prompts], [len(p) for p in prompts], tables, gate, adapters)
            finally:
                model.fused_decode = fused
            return (runner.logits(hidden), runner.kv.k[:, used].clone(), runner.kv.v[:, used].clone(),
                    gate.skip_counts(len(prompts)))

        def skipping_gate(policy):  # even rows may skip `skips` FFNs, firing at once; odd ones stay dense
            return policy.make_gate([RowSkip(skips if i % 2 == 0 else 0, 0.0) for i in range(len(prompts))],
                                    runner.device)

        dense = [step(DenseGate(runner.num_layers), native) for native in (True, False)]
        skipped = [[step(skipping_gate(policy), native) for native in (True, False)] for policy in policies]
    for (logits1, k1, v1, counts1), (logits2, k2, v2, counts2) in (dense, *skipped):
        for ours, theirs in ((logits1, logits2), (k1, k2), (v1, v2)):
            torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
        assert counts1 == counts2
    assert not torch.equal(dense[0][1], k_before)  # the step did write its K/V
    for by_policy in skipped:
        assert by_policy[0][3][0] == [skips if i % 2 == 0 else 0 for i in range(len(prompts))]  # they did skip
        assert not torch.equal(by_policy[0][0], dense[0][0])


class Closed(BaseModel):
    """A pydantic model that refuses extra fields: what a schema-held answer must validate against."""
    model_config = ConfigDict(extra="forbid")


class WeatherArgs(Closed):
    """The arguments of the tool the tool-call tests offer."""
    city: str
    unit: Literal["celsius", "fahrenheit"]


def wait_idle(server, within_s: float) -> None:
    """Wait until the server runs and queues nothing and holds no KV block (every request that ended,
    or was aborted, has left the engine); fail if that takes longer than `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if server.metric("num_requests_running") == server.metric("num_requests_waiting") == 0 \
                and server.metric("kv_cache_usage_ratio") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine still busy {within_s}s after the client left")


def grammar_accepts(grammar, text: str) -> bool:
    """Whether a compiled schema (engine/structured) takes `text` as a whole document."""
    from engine.structured import json_machine

    state = json_machine.start(grammar)
    for byte in text.encode():
        state = json_machine.advance(grammar, state, byte)
        if state is None:
            return False
    return json_machine.can_end(state, grammar)


def brute_force_mask(engine, grammar, state):
    """Every token whose bytes the JSON machine takes from `state`, each run through it alone (and
    EOS where the document may end): what a structured-outputs mask must equal."""
    import torch

    from engine.structured import json_machine

    vocabulary = engine.structured.vocabulary
    expected = torch.zeros(vocabulary.width, dtype=torch.bool)
    for token_id, data in enumerate(engine.tokenizer.token_bytes()[:vocabulary.width]):
        if data and vocabulary.advance(grammar, state, token_id) is not None:
            expected[token_id] = True
    if json_machine.can_end(state, grammar):
        expected[vocabulary.eos_ids] = True
    return expected


def prefill_logits(engine, prompt: list[int]) -> torch.Tensor:
    """The engine's logits over a prompt, prefilled in blocks of its own (then freed)."""
    runner = engine.runner
    with engine.kv_blocks([len(prompt)]) as (table,):
        return runner.logits(runner.prefill([(prompt, table, 0)]))


def hf_model_of(engine):
    """transformers' model on the engine's HF folder (its dense conversion), fp32, for reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(engine.hf_dir), dtype=torch.float32).eval()


def saved_checkpoint_engine(hf_model, dense, folder):
    """transformers' `hf_model` saved into `folder` as its own checkpoint (the tokenizer and other
    files copied from `dense`'s folder) -> (an fp32 CPU engine serving that folder, its config)."""
    import shutil

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    hf_model.save_pretrained(folder)
    for path in dense.hf_dir.iterdir():
        if path.suffix != ".safetensors" and not (folder / path.name).exists():
            shutil.copy(path, folder / path.name)
    config = EngineConfig(model=str(folder), device="cpu", dtype="float32", max_num_seqs=2, max_model_len=512)
    return LLMEngine(config), config


def assert_quantized_close_and_skipping(quantized, dense, prompts: list[list[int]], params: SamplingParams,
                                        layers: int) -> None:
    """A tiny file's quantized engine: logits within its activations' rounding (0.02) of the fp32
    engine's on every prompt, and a threshold every token meets after a short warm-up makes the
    rule skip the budget's k of the hot layers."""
    for prompt in prompts:
        assert (prefill_logits(quantized, prompt) - prefill_logits(dense, prompt)).abs().max().item() < 0.02
    skipped = quantized.generate([prompts[0]], params, SkipParams(budget=0.5, threshold=-1.0, warmup_tokens=2))[0][2]
    assert 0 < skipped.ffn_skipped <= skipped.ffn_total == params.max_tokens * layers


def assert_served_chat_is_the_engines(dense, gguf, cache_dir) -> None:
    """`skipserve --model FILE.gguf`: a greedy chat answer over HTTP is the in-process engine's text."""
    import openai

    from tests.conftest import ServerProcess

    messages = [{"role": "user", "content": "Name a colour."}]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    expected = dense.tokenizer.decode(dense.generate([dense.tokenizer.encode_chat(messages)], greedy)[0][1])
    server = ServerProcess("--model", str(gguf), "--cache-dir", str(cache_dir), "--device", "cpu",
                           "--dtype", "float32", "--max-num-seqs", "2", "--max-model-len", "512")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=gguf.name, messages=messages, max_tokens=16, temperature=0)
    finally:
        assert server.stop() == 0
    assert reply.choices[0].message.content == expected and expected


def cgroup_tree(base, files: dict[str, str], proc: str):
    """A cgroup hierarchy under `base`/cg as the kernel lays it out (`files`: path -> text) and a
    /proc/self/cgroup text -> (root, proc file)."""
    for name, text in files.items():
        path = base / "cg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (base / "cg").mkdir(parents=True, exist_ok=True)
    (base / "proc_cgroup").write_text(proc)
    return base / "cg", base / "proc_cgroup"
