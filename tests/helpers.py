"""Small helpers shared by the engine tests."""
from __future__ import annotations

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
