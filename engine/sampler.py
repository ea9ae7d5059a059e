"""Turns a step's logits into tokens: penalties, logit bias, greedy or seeded sampling, logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None


@dataclass
class Sampled:
    token_id: int
    logprob: float | None = None  # raw model logprob of token_id (when logprobs were asked)
    top_logprobs: list[tuple[int, float]] | None = None


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled | Exception]:
    """logits: [B, V] float32, one row per entry of `rows`. A row whose own sampling fails (its
    settings, its generator) gets the exception in its place; the other rows are unaffected."""
    want_logprobs = any(r.params.logprobs is not None for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    errors: dict[int, Exception] = {}
    logits = _apply_penalties_and_bias(logits, rows, errors)
    tokens = logits.max(dim=-1).indices  # argmax's result (first maximum; NaN wins), 2-3x faster on the CPU
    for i, row in enumerate(rows):
        if not row.params.greedy and i not in errors:
            try:
                tokens[i] = _sample_row(logits[i], row.params, row.generator)
            except Exception as exc:
                errors[i] = exc
    token_list = tokens.tolist()
    out: list[Sampled | Exception] = []
    for i, (row, token) in enumerate(zip(rows, token_list)):
        k = row.params.logprobs
        if i in errors:
            out.append(errors[i])
        elif k is None:
            out.append(Sampled(token))
        else:
            top = raw_logprobs[i].topk(k) if k else None
            out.append(Sampled(token, raw_logprobs[i, token].item(),
                               list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))
    return out


def _apply_penalties_and_bias(logits: torch.Tensor, rows: list[SampleRow], errors: dict[int, Exception]) -> torch.Tensor:
    touched = [i for i, r in enumerate(rows) if r.params.needs_penalties or r.params.logit_bias]
    if not touched:
        return logits
    logits = logits.clone()
    for i in touched:
        try:
            _penalize_row(logits[i], rows[i])
        except Exception as exc:
            errors[i] = exc
    return logits


def _penalize_row(row: torch.Tensor, sample_row: SampleRow) -> None:
    """Penalties and logit bias of one row, in place."""
    p, vocab = sample_row.params, row.shape[-1]
    if p.needs_penalties and sample_row.output_ids:
        out_counts = torch.bincount(torch.tensor(sample_row.output_ids, device=row.device), minlength=vocab)[:vocab]
        if p.repetition_penalty != 1.0:
            seen = out_counts > 0
            seen[torch.tensor(sample_row.prompt_ids, device=row.device)] = True
            # HF/vLLM semantics: divide positive logits, multiply negative ones
            row[seen] = torch.where(row[seen] > 0, row[seen] / p.repetition_penalty, row[seen] * p.repetition_penalty)
        row -= p.frequency_penalty * out_counts.to(row.dtype)
        row -= p.presence_penalty * (out_counts > 0).to(row.dtype)
    elif p.repetition_penalty != 1.0:
        seen = torch.tensor(sample_row.prompt_ids, device=row.device)
        row[seen] = torch.where(row[seen] > 0, row[seen] / p.repetition_penalty, row[seen] * p.repetition_penalty)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias.keys()), device=row.device)
        row[ids] += torch.tensor(list(p.logit_bias.values()), device=row.device, dtype=row.dtype)


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = logits.topk(min(p.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = cumulative - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())
