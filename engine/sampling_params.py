"""Per-request generation and FFN-skip parameters (validated here, used by the sampler/gate)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.bad_words import MAX_BAD_WORD_CHARS, MAX_BAD_WORDS


MAX_LOGPROBS = 20  # alternatives a token's logprobs may list (vLLM's default max_logprobs)
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 512  # per stop string: matching is linear in it, and the held-back tail is at most this
MAX_STOP_TOKEN_IDS = 64  # looked up per generated token, and masked per step before min_tokens


class InvalidParamError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        """`code`: the error's OpenAI code where it has one (`context_length_exceeded`)."""
        super().__init__(message)
        self.param, self.code = param, code


SAMPLING_EPS = 1e-5  # a temperature below it samples greedily
MIN_REPETITION_PENALTY = 0.01


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = None  # None = up to the context window
    max_tokens_cap: int | None = None  # the server's cap (a generation config's max_new_tokens), whatever is asked
    # the prompt computed (its logprobs, the cache filled) and no token made: `echo` with `max_tokens` 0,
    # llama.cpp's `n_predict` 0 (a prompt's length is checked as for one token)
    prompt_only: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    typical_p: float = 1.0  # 1 = off; else typical sampling's mass (engine/typical.py)
    # llama.cpp's chain: top-k, top-p and min-p (in that order) cut the distribution before the temperature
    # scales what they keep (engine/typical.py); else vLLM's: the temperature first (engine/categorical.py)
    temperature_last: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # TGI's frequency penalty: each token's share of the whole text so far (prompt and answer: its count
    # over the text's length) times the penalty; else OpenAI's, its count in the answer
    frequency_over_text: bool = False
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # the bias as tensors, built once by the sampler (engine/penalties.py), not per step
    logit_bias_tensors: object = field(default=None, repr=False, compare=False)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # the server's own stop strings beside `stop` (not counted in its limit): a chat turn's end where
    # the model has no template to end it (engine/tokenizer.py PLAIN_CHAT_TURNS)
    turn_stops: tuple[str, ...] = ()
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # a stop string that ends the text stays in it
    skip_special_tokens: bool = True  # special tokens' text left out of the answer's (vLLM's default)
    ignore_eos: bool = False
    min_tokens: int = 0  # tokens made before EOS, a stop token or a stop string may end the answer
    # vLLM's: the only tokens the answer may take (beside a grammar's: the tokens both allow)
    allowed_token_ids: list[int] | None = None
    allowed_mask: object = field(default=None, repr=False, compare=False)  # as a [V] tensor, built once (sampler.py)
    bad_words: list[str] = field(default_factory=list)  # vLLM's: words the answer never writes (bad_words.py)
    bad_words_ids: tuple = field(default=(), repr=False, compare=False)  # their token sequences (the engine's)
    # vLLM's: the prefix cache shares blocks only between requests with the same salt (kv/block_manager.py)
    cache_salt: str | None = None
    adapter: str | None = None  # the LoRA adapter (engine/lora) the request is computed through; None: the base model
    priority: int = 0  # vLLM's: lower is scheduled first, under --scheduling-policy priority (scheduler.py)
    logprobs: int | None = None  # None = off; k >= 0 = sampled token + k alternatives
    # the logprobs of the distribution drawn from (after penalties, temperature and the filters), as
    # TGI reports them; else the model's own (vLLM's and OpenAI's)
    logprobs_processed: bool = False
    prompt_logprobs: int | None = None  # None = off; k >= 0 = each prompt token's logprob + k alternatives
    response_schema: dict | None = None  # the JSON schema the answer follows (engine/structured)
    # else a regex the whole answer matches, or strings it is one of (engine/structured/whole_text.py)
    response_regex: str | None = None
    response_choices: tuple[str, ...] | None = None
    schema_param: str = "response_format"  # the request field either came from, for its errors
    # the grammar holds the answer after its thinking (engine/structured/thinking.py): "open" (the
    # prompt opened <think>), "may_open" (the answer may open it first); None: from the first token
    thinking: str | None = None
    max_tokens_param: str = "max_tokens"  # the request field max_tokens came from, for its errors
    logprobs_param: str = "top_logprobs"  # the request field the logprobs counts came from

    @property
    def constrained(self) -> bool:
        """The answer is held to a grammar (engine/structured)."""
        return self.response_schema is not None or self.response_regex is not None or \
            self.response_choices is not None

    @property
    def greedy(self) -> bool:
        # below SAMPLING_EPS (as vLLM's) the distribution is greedy's, and dividing by it would overflow
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def validate(self, vocab_size: int) -> None:
        def check(ok: bool, param: str, message: str):
            if not ok:
                raise InvalidParamError(message, param)

        check(self.n >= 1, "n", "n must be at least 1")
        check(self.max_tokens is None or self.max_tokens >= 1, self.max_tokens_param,
              f"{self.max_tokens_param} must be at least 1")
        check(0.0 <= self.temperature <= 2.0, "temperature", "temperature must be in [0, 2]")
        check(0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]")
        check(self.top_k >= 0 or self.top_k == -1, "top_k", "top_k must be -1, 0 or positive")
        check(0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]")
        check(0.0 < self.typical_p <= 1.0, "typical_p", "typical_p must be in (0, 1]")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "presence_penalty must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "frequency_penalty must be in [-2, 2]")
        # from 0.01 up: a smaller one divides logits past float32's range (1e-46 is 0 in float32)
        check(MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2.0, "repetition_penalty",
              f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 2]")
        check(self.min_tokens >= 0, "min_tokens", "min_tokens must be at least 0")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
              f"min_tokens ({self.min_tokens}) must be at most {self.max_tokens_param} ({self.max_tokens})")
        check(all(0 <= t < vocab_size for t in self.stop_token_ids), "stop_token_ids",
              "stop_token_ids must be token ids of the vocabulary")
        check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
              f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        check(-2**63 <= self.priority < 2**63, "priority", "priority must be a 64-bit integer")
        check(self.cache_salt is None or isinstance(self.cache_salt, str) and self.cache_salt, "cache_salt",
              "cache_salt must be a non-empty string")
        for count in (self.logprobs, self.prompt_logprobs):
            check(count is None or 0 <= count <= MAX_LOGPROBS, self.logprobs_param,
                  f"{self.logprobs_param} must be in [0, {MAX_LOGPROBS}]")
        if self.allowed_token_ids is not None:
            check(len(self.allowed_token_ids) > 0, "allowed_token_ids", "allowed_token_ids must not be empty")
            check(all(0 <= t < vocab_size for t in self.allowed_token_ids), "allowed_token_ids",
                  "allowed_token_ids must be token ids of the vocabulary")
        check(len(self.bad_words) <= MAX_BAD_WORDS, "bad_words", f"at most {MAX_BAD_WORDS} bad_words")
        check(all(isinstance(w, str) and w.strip() and len(w) <= MAX_BAD_WORD_CHARS for w in self.bad_words),
              "bad_words", f"bad_words must be words of 1 to {MAX_BAD_WORD_CHARS} characters")
        for token, bias in self.logit_bias.items():
            check(0 <= token < vocab_size, "logit_bias", f"logit_bias token id {token} is outside the vocabulary")
            check(-100.0 <= bias <= 100.0, "logit_bias", "logit_bias values must be in [-100, 100]")
        # (worded to name the field once: a route that serves another API's field renames it, server/errors.py)
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop must hold non-empty strings")
        check(len(self.stop) <= MAX_STOP_SEQUENCES, "stop", f"stop must hold at most {MAX_STOP_SEQUENCES} strings")
        check(all(len(s) <= MAX_STOP_CHARS for s in self.stop), "stop",
              f"stop must hold strings of at most {MAX_STOP_CHARS} characters")
        if self.top_k == -1:
            self.top_k = 0


@dataclass
class SkipParams:
    """FFN-skip control of one request; None fields take the server's per-model defaults."""

    budget: float | None = None
    threshold: float | None = None
    warmup_tokens: int | None = None
