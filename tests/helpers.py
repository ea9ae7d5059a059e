"""Small helpers shared by the engine tests."""
from __future__ import annotations

import copy

import torch

from engine.sampling_params import SamplingParams


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy tokens, cut after the first EOS (as the engine stops there)."""
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
