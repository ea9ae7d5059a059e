"""One generated sequence (a request with n choices has n of them): plain state, no tensors."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.bad_words import banned_next
from engine.detokenizer import IncrementalDetokenizer
from engine.ngram_drafter import NgramDrafter
from engine.pooling import Pooling
from engine.sampling_params import SamplingParams
from engine.skip.base import TokenSkipPlan
from engine.structured.constraint import Constraint


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: str
    request_id: str
    index: int  # choice index within its request
    prompt_ids: list[int]
    params: SamplingParams
    skip_plan: TokenSkipPlan
    max_tokens: int
    detokenizer: IncrementalDetokenizer
    seed: int
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    dense_kv: int = 0  # leading tokens whose K/V were computed with every FFN (reusable by other prompts)
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prompt_computed: int = 0  # leading prompt tokens computed (or cached) at least once
    block_table: list[int] = field(default_factory=list)  # KV blocks holding its tokens, in order
    num_preemptions: int = 0
    arrival: int = 0  # its place in the scheduler's arrival order
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it (not EOS)
    ffn_skipped: int = 0
    ffn_total: int = 0
    constraint: Constraint | None = None  # where its answer is in its response_format's JSON
    # the tokens that would end it (EOS unless ignored, stop_token_ids), refused while it has made
    # fewer than params.min_tokens
    ending_tokens: tuple[int, ...] = ()
    drafter: NgramDrafter | None = None  # where speculative decoding is on and may apply to it
    # with params.prompt_logprobs: the logprob entries (engine/outputs.TokenLogprob) of prompt tokens
    # 1.. computed so far; handed out with the sequence's first output
    prompt_logprobs: list | None = None
    # an embeddings request's input: pooled as it is computed, and done then (it makes no tokens)
    pooling: Pooling | None = None
    lora_slot: int = 0  # the LoRA adapter's slot it is computed through (engine/lora); 0: the base model

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt positions still to score."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    @property
    def computes_whole_prompt(self) -> bool:
        """Prompt positions whose hidden states are still needed (to score or to pool), so none
        may come from the prefix cache."""
        pools = self.pooling is not None and self.pooling.needs_every_position
        return self.wants_prompt_logprobs or (pools and self.pooling.rows < len(self.prompt_ids))

    @property
    def makes_tokens(self) -> bool:
        """False for an embeddings request's input, which ends with its prefill."""
        return self.pooling is None

    def refused_tokens(self, output: list[int]) -> tuple[int, ...] | None:
        """What the sampler may not pick after the answer's tokens `output`: the ending tokens before
        min_tokens (not for a schema-held answer, which ends where its document does), and the tokens
        that would finish one of its bad_words."""
        early = len(output) < self.params.min_tokens and self.constraint is None
        ending = self.ending_tokens if early and self.ending_tokens else None
        if not self.params.bad_words_ids:
            return ending
        refused = banned_next(self.params.bad_words_ids, output).union(ending or ())
        return tuple(sorted(refused)) or None

    @property
    def prefix_salt(self) -> str | tuple | None:
        """What its cached prefix blocks are published and found under: its cache_salt, and its LoRA
        adapter where it has one (an adapter's K/V are not the base model's)."""
        if not self.lora_slot:
            return self.params.cache_salt
        return (self.params.cache_salt, self.lora_slot)  # (a slot is never reused: nor its blocks)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_len(self) -> int:
        """Tokens computed as prefill: the prompt, or after a preemption every token but the last
        (whose K/V the next decode step writes, as it would have without the preemption)."""
        return self.num_tokens - 1 if self.output_ids else len(self.prompt_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prefill_len

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
