"""Repetition, frequency and presence penalties and logit bias, for the rows of a step at once,
in place, touching only the logits of the tokens concerned.

Semantics as HF transformers and vLLM: the bias is added first (vLLM's logit-bias processor runs
before its penalties, as HF's and llama.cpp's do); the repetition penalty divides the positive
logits and multiplies the negative ones of every token seen in the prompt or the output; the
frequency penalty subtracts penalty x count of each output token (TGI's, `frequency_over_text`:
penalty x the token's count in the prompt and output over their length), the presence penalty
subtracts its value once per output token seen.
"""
from __future__ import annotations

from collections import Counter

import torch

from engine.rows import column, device_values, padded
from engine.sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> None:
    """logits [B, V], one row per entry of `params`; changed in place."""
    for i, p in enumerate(params):
        if p.logit_bias:
            ids, values = bias_tensors(p, logits)
            logits[i, ids] += values
    repeated = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeated:
        # every token the row has seen, once; a row's list is padded with its own first token
        seen_ids = [list(set(prompts[i]).union(outputs[i])) for i in repeated]
        index = device_values(repeated, logits.device)[:, None], padded(seen_ids, logits)
        seen = logits[index]
        penalty = column([params[i].repetition_penalty for i in repeated], logits)
        logits[index] = torch.where(seen > 0, seen / penalty, seen * penalty)
    counted = [i for i, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
    counts = [_frequencies(params[i], prompts[i], outputs[i]) for i in counted]
    if any(counts):
        ids = [list(c) for c in counts]
        values = [[params[i].frequency_penalty * n + params[i].presence_penalty for n in c.values()]
                  for i, c in zip(counted, counts)]
        logits.index_put_((device_values(counted, logits.device)[:, None], padded(ids, logits, pad=0)),
                          -padded(values, logits, pad=0.0, dtype=logits.dtype), accumulate=True)


def _frequencies(params: SamplingParams, prompt: list[int], output: list[int]) -> dict:
    """Each token's count in the output; TGI's (`frequency_over_text`, which takes no presence
    penalty): its share of the prompt and output together."""
    if not params.frequency_over_text:
        return Counter(output)
    text = len(prompt) + len(output)
    return {token: n / text for token, n in Counter(prompt + output).items()}


def bias_tensors(params: SamplingParams, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's logit_bias as (ids, values) on the logits' device and in their dtype: made once, at
    its first step (a bias may name every token of the vocabulary)."""
    made = params.logit_bias_tensors
    if made is None or made[0].device != logits.device or made[1].dtype != logits.dtype:
        made = params.logit_bias_tensors = (device_values(list(params.logit_bias), logits.device),
                                            device_values(list(params.logit_bias.values()), logits.device,
                                                          logits.dtype))
    return made
