"""What the engine hands back per step and sequence: deltas, ready to stream."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    token: str
    token_id: int
    logprob: float | None  # None for a prompt's first token, which nothing predicts
    top: list[tuple[str, int, float]]  # (text, id, logprob) alternatives, best first
    rank: int | None = None  # a prompt token's: how many tokens are at least as likely (1: the likeliest)


@dataclass
class SequenceOutput:
    request_id: str
    index: int
    text: str  # new final text since the last output
    token_ids: list[int]  # new tokens since the last output
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache
    completion_tokens: int
    ffn_skipped: int
    ffn_total: int
    error: str | None = None  # set (with finished) when generation failed for this request alone
    invalid_request: bool = False  # with error: the request's own settings failed it (a 400, not a 500)
    # with SamplingParams.prompt_logprobs, on a sequence's first output: one entry per prompt token
    prompt_logprobs: list[TokenLogprob] | None = None
    embedding: list[float] | None = None  # an embeddings request's input: its vector, with its one output
    stop_reason: int | str | None = None  # finished by a stop string (it) or a stop token (its id); else None


@dataclass
class StepStats:
    """Counts of one engine step, for metrics."""

    generated_tokens: int = 0
    draft_tokens: int = 0  # speculative draft tokens checked
    accepted_draft_tokens: int = 0  # of them, the ones the model produced too (in generated_tokens)
